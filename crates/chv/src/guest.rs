//! The guest-side mount script, shipped with the crate.

/// `guest/vmvol-mount.sh`: POSIX sh (busybox) that mounts the config disk
/// read-only, sources `/config.sh` and mounts every volume (`ro` as
/// `ro,noload`, `rw` plainly, `overlay` as base + overlay disk + overlayfs),
/// reporting each failure and going on. Usage in the guest:
/// `vmvol-mount.sh [CONFIG_DEVICE]` (default `/dev/vdc`); exit status 0 when
/// every mount succeeded, 1 otherwise.
pub const MOUNT_SCRIPT: &str = include_str!("../../../guest/vmvol-mount.sh");
