//! Property test: random archives (names, nesting, sizes, holes, links) read
//! back byte for byte through ext4-view, and e2fsck -fn stays clean.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmvol_format::{Control, Prealloc, RawImage};
use vmvol_fs::{populate_tar, MkfsOptions, PopulateOptions};

#[derive(Debug, Clone)]
enum Node {
    File { data: Vec<u8>, zeros_before: usize },
    Link(usize),
    Symlink(String),
}

fn node() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (prop::collection::vec(any::<u8>(), 0..9000), 0usize..3).prop_map(|(data, z)| Node::File { data, zeros_before: z * 4096 }),
        1 => (0usize..100).prop_map(Node::Link),
        1 => "[a-z]{1,9}(/[a-z]{1,9}){0,11}".prop_map(Node::Symlink),
    ]
}

fn paths() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-c]{1,2}(/[a-c]{1,3}){0,3}x", 1..40)
        .prop_map(|s| s.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_archives_read_back(paths in paths(), nodes in prop::collection::vec(node(), 40), bs in prop::sample::select(vec![1024u32, 4096])) {
        // Files end in "x" so no path is a prefix directory of another file.
        let mut b = tar::Builder::new(Vec::new());
        let mut expect: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut links: BTreeMap<String, String> = BTreeMap::new();
        let mut files: Vec<String> = Vec::new();
        for (p, n) in paths.iter().zip(nodes.iter()) {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(1_000_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match n {
                Node::Link(i) if !files.is_empty() => {
                    let target = files[i % files.len()].clone();
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, &target).unwrap();
                    expect.insert(p.clone(), expect[&target].clone());
                }
                Node::Symlink(t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                    links.insert(p.clone(), t.clone());
                }
                other => {
                    // A link with no earlier file becomes a small file.
                    let (data, z) = match other {
                        Node::File { data, zeros_before } => (data.clone(), *zeros_before),
                        _ => (vec![7u8; 5], 0),
                    };
                    let mut content = vec![0u8; z];
                    content.extend_from_slice(&data);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, p, &content[..]).unwrap();
                    expect.insert(p.clone(), content);
                    files.push(p.clone());
                }
            }
        }
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let img_path = dir.path().join("p.raw");
        let img = RawImage::create(&img_path, 32 << 20, Prealloc::Off, &Control::new()).unwrap();
        let opts = PopulateOptions { mkfs: MkfsOptions { block_size: bs, ..Default::default() }, ..Default::default() };
        populate_tar(&img, &tar[..], &opts, &Control::new()).unwrap();
        drop(img);
        let fs = ext4_view::Ext4::load_from_path(&img_path).unwrap();
        for (p, content) in &expect {
            let abs = format!("/{p}");
            prop_assert!(fs.read(abs.as_str()).unwrap() == *content, "{}", p);
        }
        for (p, t) in &links {
            let abs = format!("/{p}");
            let target = fs.read_link(abs.as_str()).unwrap();
            prop_assert_eq!(target.as_ref(), t.as_bytes());
        }
        if crate::support::require_tool("e2fsck") {
            crate::support::e2fsck_clean(&img_path);
        }
    }
}
