#!/usr/bin/env bash
# Builds the fuzz seed corpora in fuzz/seeds/<corpus>/ with real tools:
# qemu-img/qemu-io (qcow2), mke2fs and our own mkfs (ext4), GNU tar (tar),
# and the pool API (pool records). Deterministic apart from tool-chosen
# UUIDs/timestamps. Seeds stay small: qcow2 images are written in the
# targets' sparse input form, ext4 images without their trailing zeros.
#
#   fuzz/make-corpus.sh            # (re)writes fuzz/seeds/
#
# Needs qemu-img, qemu-io, mke2fs, tar, gzip, cargo.
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD
for t in qemu-img qemu-io mke2fs tar gzip cargo; do
    command -v "$t" >/dev/null || { echo "make-corpus: $t not found" >&2; exit 1; }
done
cargo build -q --release --example seedgen --target-dir target/seedgen
seedgen=$here/target/seedgen/release/examples/seedgen

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf seeds
mkdir -p seeds/qcow2 seeds/ext4 seeds/tar seeds/pool

# ---------------------------------------------------------------- qcow2
q=$work/q
mkdir -p "$q"
cd "$q"
qio() { qemu-io -f qcow2 "$@" >/dev/null; }
M=4M
# A raw source with data in a few places (pattern, zeros, random-looking).
qemu-img create -q -f raw src.raw $M
qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'write -P 0x11 1M 8k' \
    -c 'write -P 0x5a 3M 512' src.raw >/dev/null
head -c 4096 /dev/urandom >rand.bin
dd if=rand.bin of=src.raw bs=4k seek=512 conv=notrunc status=none

qemu-img create -q -f qcow2 empty.qcow2 $M
qemu-img convert -q -O qcow2 src.raw data.qcow2
qemu-img convert -q -O qcow2 -o compat=0.10 src.raw v2.qcow2
qemu-img convert -q -c -O qcow2 -o compression_type=zlib src.raw zlib.qcow2
qemu-img convert -q -c -O qcow2 -o compression_type=zstd src.raw zstd.qcow2
qemu-img convert -q -c -O qcow2 -o compression_type=zstd,cluster_size=4k src.raw zstd-4k.qcow2
qemu-img convert -q -O qcow2 -o cluster_size=512 src.raw c512.qcow2
qemu-img convert -q -c -O qcow2 -o cluster_size=512 src.raw c512-zlib.qcow2
qemu-img convert -q -O qcow2 -o cluster_size=2M src.raw c2m.qcow2
qemu-img convert -q -O qcow2 -o refcount_bits=1 src.raw rc1.qcow2
qemu-img convert -q -O qcow2 -o refcount_bits=64 src.raw rc64.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata prealloc.qcow2 $M
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k ext-l2.qcow2 $M
qemu-img create -q -f qcow2 -o data_file=data.bin,data_file_raw=on extdata.qcow2 $M
# Backing chains: the harness provides base.qcow2 and base.raw next to the
# fuzzed image; qemu-img needs them here to create the overlays.
qemu-img create -q -f qcow2 base.qcow2 $M
qemu-img create -q -f raw base.raw $M
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 over-q.qcow2 $M
qio -c 'write -P 0x33 128k 64k' over-q.qcow2
qemu-img create -q -f qcow2 -b base.raw -F raw over-r.qcow2 $M
qio -c 'write -P 0x44 2M 4k' over-r.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 over-small.qcow2 8M
# Internal snapshots with diverging data.
qemu-img convert -q -O qcow2 src.raw snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qio -c 'write -P 0x77 0 128k' snap.qcow2
qemu-img snapshot -c s2 snap.qcow2
qio -c 'discard 1M 64k' snap.qcow2
# lazy_refcounts, left dirty by a crash (qemu-io abort) mid-session.
qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 $M
(qemu-io -f qcow2 -c 'write -P 0x99 0 192k' -c abort lazy.qcow2) >/dev/null 2>&1 || true
qemu-img convert -q -O qcow2 -o cluster_size=4k,lazy_refcounts=on src.raw lazy4k.qcow2
(qemu-io -f qcow2 -c 'write -P 0x98 64k 64k' -c abort lazy4k.qcow2) >/dev/null 2>&1 || true
# Persistent dirty bitmap (autoclear feature + extension).
qemu-img convert -q -O qcow2 src.raw bitmap.qcow2
qemu-img bitmap -q --add bitmap.qcow2 b0 2>/dev/null || qemu-img bitmap --add bitmap.qcow2 b0
# Leaked cluster: a refcount without a user (check/repair paths).
qemu-img convert -q -O qcow2 -o cluster_size=4k src.raw leak.qcow2
qemu-io -f qcow2 -c 'write -P 0x12 0 4k' -c 'discard 0 4k' leak.qcow2 >/dev/null
for f in *.qcow2; do
    case $f in base.qcow2) continue ;; esac
    "$seedgen" sparse "$f" "$here/seeds/qcow2/${f%.qcow2}"
done
cd "$here"

# ---------------------------------------------------------------- ext4
e=$work/e
mkdir -p "$e/tree/dir/sub"
echo hello >"$e/tree/hello.txt"
head -c 20000 /dev/urandom >"$e/tree/dir/blob"
ln -s hello.txt "$e/tree/link"
ln "$e/tree/hello.txt" "$e/tree/dir/hard"
mk() { # name size mke2fs-args...
    local n=$1 s=$2
    shift 2
    mke2fs -q -F -E root_owner=0:0 -T default "$@" "$e/$n.img" "$s" >/dev/null
    "$seedgen" trim "$e/$n.img" "seeds/ext4/$n" 524288
}
mk ext4-1k 4M -t ext4 -b 1024
mk ext4-4k 8M -t ext4 -b 4096
mk ext4-4k-nojournal 8M -t ext4 -b 4096 -O ^has_journal
mk ext4-1k-sparse2 4M -t ext4 -b 1024 -O sparse_super2
mk ext4-bigalloc 8M -t ext4 -b 1024 -O bigalloc,^has_journal -C 16384
mk ext4-flexbg-off 4M -t ext4 -b 1024 -O ^flex_bg,^has_journal
mk ext4-64bit-meta 8M -t ext4 -b 1024 -O 64bit,meta_bg,^resize_inode
mk ext2-1k 4M -t ext2 -b 1024
mk ext4-1k-files 4M -t ext4 -b 1024 -O ^has_journal -d "$e/tree"
mk ext4-2k-files 8M -t ext4 -b 2048 -d "$e/tree"
for spec in "own-4k-nojournal 8388608 4096 none" "own-1k 4194304 1024 default" \
    "own-2k-nojournal 4194304 2048 none"; do
    set -- $spec
    "$seedgen" mkfs "$e/$1.img" "$2" "$3" "$4"
    "$seedgen" trim "$e/$1.img" "seeds/ext4/$1" 524288
done

# ---------------------------------------------------------------- tar
t=$work/t
mkdir -p "$t/src/d/e"
cd "$t/src"
echo a >a.txt
printf 'x%.0s' $(seq 1 3000) >d/three-k
long=$(printf 'n%.0s' $(seq 1 120))
echo long >"d/$long"
ln -s a.txt sym
ln -s "d/$long" longsym
ln a.txt d/e/hard
mkfifo fifo
truncate -s 1M sparse.bin
printf data | dd of=sparse.bin bs=1 seek=700000 conv=notrunc status=none
touch -d @1000000000 a.txt
chmod 4755 d/three-k
cd "$t"
for fmt in gnu pax ustar v7 oldgnu; do
    tar --format=$fmt -b 1 --owner=1000 --group=1000 --exclude=./sparse.bin \
        -cf "$here/seeds/tar/$fmt.tar" -C src . 2>/dev/null || true
done
tar --format=gnu -b 1 --sparse -cf "$here/seeds/tar/gnu-sparse.tar" -C src sparse.bin a.txt
tar --format=pax -b 1 --sparse -cf "$here/seeds/tar/pax-sparse.tar" -C src sparse.bin a.txt
tar --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,atime:=0 \
    -b 1 --xattrs -cf "$here/seeds/tar/pax-xattr.tar" -C src a.txt d 2>/dev/null || true
tar --format=gnu -czf "$here/seeds/tar/gnu.tar.gz" -C src a.txt d/e sym
tar --format=ustar -b 1 -cf "$here/seeds/tar/dirs-only.tar" -C src ./d/e
cd "$here"

# ---------------------------------------------------------------- pool
"$seedgen" pool seeds/pool

du -sh seeds/*
