//! A real Linux guest under QEMU mounts the volumes.
