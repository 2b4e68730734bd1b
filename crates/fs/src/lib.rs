//! ext4 written in pure Rust on any vmvol block image.
