//! ext4 on-disk format knowledge, in one place for the writer (`mkfs`,
//! `populate`) and the reader (the free map): superblock fields and feature
//! bits, checksums, block groups (superblock backups, descriptors), bitmaps,
//! and the inode, extent and directory records the writer builds.

pub(crate) mod bitmap;
pub(crate) mod csum;
pub(crate) mod features;
pub(crate) mod field;
pub(crate) mod group;
pub(crate) mod records;
pub(crate) mod superblock;
