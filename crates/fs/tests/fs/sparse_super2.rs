//! Superblock backups with `sparse_super2`: only group 0 and the groups named
//! in `s_backup_bgs` hold one — not the powers of 3, 5 and 7 of plain
//! `sparse_super` (vmvol once had two `has_super` copies, one of which forgot
//! this). Checked against `mke2fs -O sparse_super2` and `dumpe2fs`.

use std::collections::BTreeSet;
use std::path::Path;

use crate::free_map::{assert_same_as_dumpe2fs, mkfs};
use crate::support::{require_tool, run};

/// Groups `dumpe2fs` lists with a primary or backup superblock.
fn super_groups(img: &Path) -> BTreeSet<u64> {
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let mut out = BTreeSet::new();
    let mut group = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Group ") {
            group = rest
                .split(':')
                .next()
                .and_then(|g| g.trim().parse::<u64>().ok());
        } else if line.contains("superblock at") {
            out.insert(group.expect("superblock line inside a group"));
        }
    }
    out
}

/// 64 groups of 1024 one-KiB blocks, so that the sparse_super groups
/// 3, 5, 7, 9, 25, 27 and 49 all exist.
fn case(backups: u32) -> (BTreeSet<u64>, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let n = format!("num_backup_sb={backups}");
    let img = mkfs(
        dir.path(),
        "mkfs.ext4",
        64 << 20,
        &["-b", "1024", "-g", "1024", "-O", "sparse_super2", "-E", &n],
    );
    (super_groups(&img), dir, img)
}

#[test]
fn backups_only_in_named_groups_and_free_map_matches() {
    if !require_tool("mkfs.ext4") || !require_tool("dumpe2fs") || !require_tool("e2fsck") {
        return;
    }
    for (backups, want) in [(0u32, vec![0u64]), (1, vec![0, 1]), (2, vec![0, 1, 63])] {
        let (groups, _dir, img) = case(backups);
        assert_eq!(
            groups,
            want.iter().copied().collect(),
            "num_backup_sb={backups}: dumpe2fs superblock groups"
        );
        // Exactly dumpe2fs's free list: with sparse_super's rule the first
        // blocks of groups 3, 5, 7, 9, 25, 27 and 49 would be missing from it.
        // (Some of those blocks hold other groups' inode tables under
        // flex_bg; the rest must be free, enough of them to give this teeth.)
        let m = assert_same_as_dumpe2fs(&img);
        let free_firsts = [3u64, 5, 7, 9, 25, 27, 49]
            .into_iter()
            .filter(|g| m.is_free((1 + g * 1024) * 1024, 1024))
            .count();
        assert!(
            free_firsts >= 5,
            "num_backup_sb={backups}: only {free_firsts} sparse_super groups start free"
        );
    }
}

/// Plain `sparse_super` for contrast: the powers of 3, 5 and 7 do hold copies.
#[test]
fn sparse_super_backups_in_powers_of_3_5_7() {
    if !require_tool("mkfs.ext4") || !require_tool("dumpe2fs") || !require_tool("e2fsck") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = mkfs(
        dir.path(),
        "mkfs.ext4",
        64 << 20,
        &["-b", "1024", "-g", "1024"],
    );
    let want: BTreeSet<u64> = [0, 1, 3, 5, 7, 9, 25, 27, 49].into_iter().collect();
    assert_eq!(super_groups(&img), want);
    let m = assert_same_as_dumpe2fs(&img);
    for g in [3u64, 5, 7, 9, 25, 27, 49] {
        assert!(!m.is_free((1 + g * 1024) * 1024, 1024), "group {g} backup");
    }
}
