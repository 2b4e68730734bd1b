#!/bin/sh
# vmvol-mount.sh: mount an instance's volumes inside the guest (POSIX sh, runs under busybox).
#
# Usage: vmvol-mount.sh [CONFIG_DEVICE]     (default /dev/vdc)
# Environment: VMVOL_ROOT        prefix for mount points (e.g. the new root before switch_root)
#              VMVOL_CONFIG_DIR  where the config disk is mounted (default /mnt/vmvol-config)
#
# The config disk (made by vmvol-chv) holds /config.sh: VMVOL_MOUNT_COUNT and, per mount i,
# VMVOL_MOUNT_<i>_DEVICE, _PATH, _MODE (ro|rw|overlay), _OVERLAY_DEVICE. Modes:
#   ro       mount -o ro,noload (noload: no journal replay, so shared read-only mounts are safe)
#   rw       plain read-write mount
#   overlay  base ro,noload on /mnt/vol-base-<dev>, overlay disk on /mnt/vol-overlay-<dev>,
#            overlayfs with upper/ and work/ on the overlay disk
# Each mount is reported on stdout ("vmvol-mount: ok ..." or "vmvol-mount: FAILED ...");
# a failure does not stop the others. Exit status: 0 if every mount succeeded, else 1.

cfg_dev=${1:-/dev/vdc}
cfg_dir=${VMVOL_CONFIG_DIR:-/mnt/vmvol-config}
root=${VMVOL_ROOT:-}

say() { echo "vmvol-mount: $*"; }

mkdir -p "$cfg_dir" || { say "FAILED config $cfg_dev: cannot create $cfg_dir"; exit 1; }
if ! mount -t ext4 -o ro,noload "$cfg_dev" "$cfg_dir"; then
  say "FAILED config $cfg_dev: cannot mount it read-only on $cfg_dir"
  exit 1
fi
if [ ! -r "$cfg_dir/config.sh" ]; then
  say "FAILED config $cfg_dev: no config.sh"
  exit 1
fi
# The file's values are single-quoted by vmvol-chv: sourcing it assigns, never runs them.
. "$cfg_dir/config.sh"
case ${VMVOL_MOUNT_COUNT:-} in
  '' | *[!0-9]*) say "FAILED config $cfg_dev: bad VMVOL_MOUNT_COUNT"; exit 1 ;;
esac

# mount_one DEVICE PATH MODE OVERLAY_DEVICE; prints why on failure.
mount_one() {
  dev=$1 target=$root$2 mode=$3 odev=$4
  mkdir -p "$target" || { echo "cannot create $target"; return 1; }
  case $mode in
    ro)
      mount -t ext4 -o ro,noload "$dev" "$target" || { echo "mount ro,noload failed"; return 1; }
      ;;
    rw)
      mount -t ext4 "$dev" "$target" || { echo "mount rw failed"; return 1; }
      ;;
    overlay)
      [ -n "$odev" ] || { echo "overlay without overlay device"; return 1; }
      name=${dev##*/}
      base=/mnt/vol-base-$name
      ovl=/mnt/vol-overlay-$name
      mkdir -p "$base" "$ovl" || { echo "cannot create $base or $ovl"; return 1; }
      mount -t ext4 -o ro,noload "$dev" "$base" || { echo "mount base ro,noload failed"; return 1; }
      if ! mount -t ext4 "$odev" "$ovl"; then
        umount "$base"
        echo "mount overlay disk $odev failed"
        return 1
      fi
      mkdir -p "$ovl/upper" "$ovl/work" || { echo "cannot create upper/work on $odev"; return 1; }
      mount -t overlay -o "lowerdir=$base,upperdir=$ovl/upper,workdir=$ovl/work" overlay "$target" ||
        { echo "mount overlayfs failed"; return 1; }
      ;;
    *)
      echo "unknown mode"
      return 1
      ;;
  esac
  return 0
}

failed=0
i=0
while [ "$i" -lt "$VMVOL_MOUNT_COUNT" ]; do
  # $i is a number: the eval only picks variable names, values are expanded once.
  eval "m_dev=\${VMVOL_MOUNT_${i}_DEVICE-}; m_path=\${VMVOL_MOUNT_${i}_PATH-}"
  eval "m_mode=\${VMVOL_MOUNT_${i}_MODE-}; m_odev=\${VMVOL_MOUNT_${i}_OVERLAY_DEVICE-}"
  if why=$(mount_one "$m_dev" "$m_path" "$m_mode" "$m_odev" 2>&1); then
    say "ok $m_dev $m_path $m_mode"
  else
    say "FAILED $m_dev $m_path $m_mode: $(echo "$why" | tr '\n' ' ')"
    failed=1
  fi
  i=$((i + 1))
done
exit "$failed"
