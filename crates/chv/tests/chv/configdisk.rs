//! The config disk against e2fsprogs: e2fsck -fn clean, debugfs reads the files.
