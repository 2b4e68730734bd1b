//! `RbdImage` as a BlockIo: patterns written through librbd read back the
//! same and match `rbd export`; zeroing, discard, known_zero, read-only
//! handles, range checks; an ext4 made by vmvol-fs checks clean.

use proptest::prelude::*;
use vmvol_format::BlockIo;
use vmvol_rbd::Connection;

use crate::cluster::{ceph, cluster, export, namespace};

const MIB: u64 = 1 << 20;

#[test]
fn patterns_match_rbd_export() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    let conn = Connection::connect(&spec).unwrap();
    conn.create_image("img", 20 * MIB).unwrap();
    let io = conn.open_image("img", true).unwrap();
    assert_eq!(io.size(), 20 * MIB);
    assert!(io.known_zero(0, 20 * MIB).unwrap());
    let mut model = vec![0u8; (20 * MIB) as usize];
    // Unaligned writes across object (4 MiB) boundaries.
    let writes: &[(u64, usize, u8)] = &[
        (0, 4096, 1),
        (4 * MIB - 100, 300, 2),
        (7 * MIB + 3, 1 << 20, 3),
        (16 * MIB - 512, 512, 4),
    ];
    for &(off, len, b) in writes {
        let buf: Vec<u8> = (0..len).map(|i| b ^ (i as u8)).collect();
        io.write_at(&buf, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    }
    io.flush().unwrap();
    assert!(!io.known_zero(0, 4096).unwrap());
    // Object granularity (4 MiB): only the untouched last object is known.
    assert!(io.known_zero(16 * MIB, 4 * MIB).unwrap());
    assert!(!io.known_zero(12 * MIB, 8 * MIB).unwrap());
    let mut back = vec![0u8; model.len()];
    io.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs");
    // Zeroing and discard read as zeros, partial objects included.
    io.write_zeroes(7 * MIB + 10, 1000).unwrap();
    model[(7 * MIB + 10) as usize..(7 * MIB + 1010) as usize].fill(0);
    io.discard(3, 4093).unwrap();
    model[3..4096].fill(0);
    io.flush().unwrap();
    let t = tempfile::tempdir().unwrap();
    let exported = export(c, &spec, "img", &t.path().join("x.raw"));
    assert!(
        exported == model,
        "rbd export differs from what was written"
    );
    // Out of range and read-only refusals.
    assert!(matches!(
        io.write_at(b"x", 20 * MIB),
        Err(vmvol_format::Error::OutOfRange { .. })
    ));
    let ro = conn.open_image("img", false).unwrap();
    assert!(ro.is_read_only());
    assert!(matches!(
        ro.write_at(b"x", 0),
        Err(vmvol_format::Error::ReadOnly { .. })
    ));
    let mut one = [0u8; 1];
    ro.read_at(&mut one, 0).unwrap();
    assert_eq!(one[0], 1);
    // A missing image is an error naming it.
    let e = conn.open_image("nope", false).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("open image"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    /// Random writes/zeroes against a byte model.
    #[test]
    fn random_ops_match_model(ops in proptest::collection::vec((0u64..(8 * MIB), 1usize..20000, any::<u8>(), any::<bool>()), 1..12)) {
        let Some(c) = cluster() else { return Ok(()) };
        let spec = namespace(c);
        let conn = Connection::connect(&spec).unwrap();
        conn.create_image("m", 8 * MIB).unwrap();
        let io = conn.open_image("m", true).unwrap();
        let mut model = vec![0u8; (8 * MIB) as usize];
        for (off, len, b, zero) in ops {
            let len = len.min((8 * MIB - off) as usize);
            if zero {
                io.write_zeroes(off, len as u64).unwrap();
                model[off as usize..off as usize + len].fill(0);
            } else {
                let buf = vec![b; len];
                io.write_at(&buf, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&buf);
            }
        }
        let mut back = vec![0u8; model.len()];
        io.read_at(&mut back, 0).unwrap();
        prop_assert!(back == model);
    }
}

#[test]
fn ext4_by_vmvol_fs_checks_clean() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    let conn = Connection::connect(&spec).unwrap();
    conn.create_image("fs", 64 * MIB).unwrap();
    let io = conn.open_image("fs", true).unwrap();
    vmvol_fs::mkfs(&io, &vmvol_fs::MkfsOptions::default()).unwrap();
    io.flush().unwrap();
    drop(io);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("fs.raw");
    export(c, &spec, "fs", &out);
    let r = std::process::Command::new("e2fsck")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-fn"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    let _ = ceph;
}
