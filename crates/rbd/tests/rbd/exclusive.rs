//! No double read-write across hosts: two processes, each a host with its
//! own registry root (so its own instance records) over the same RBD pool,
//! race to attach one volume read-write under distinct instance ids. The
//! volume record, changed under the pool's lease lock, lets exactly one win;
//! the other is refused as in use, naming the winner.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use vmvol_pool::*;
use vmvol_rbd::{RbdOptions, RbdProvider};
use vmvol_volume::{AttachMode, ErrorKind, Volumes};

use crate::cluster::cluster;
use crate::compress::{blank_ext4, rbd_volumes, rw_request};
use crate::conformance::LEASE;

const HOST: &str = "VMVOL_RBD_TEST_ATTACH_HOST";

/// A host (a child of `one_read_write_attachment_across_hosts`): opens the
/// registry root it is given, says "ready", then for each stdin line
/// "<volume> <instance>" attaches that volume read-write and prints the
/// outcome on one line.
#[test]
fn attach_host() {
    let Some(root) = std::env::var_os(HOST) else {
        return; // only meaningful as a child
    };
    register_backend(Arc::new(RbdProvider {
        options: RbdOptions {
            lease: LEASE,
            ..RbdOptions::default()
        },
    }));
    let vols = Volumes::with_wait(Registry::open(root).unwrap(), Wait::Block);
    println!("ready");
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let Some((vol, inst)) = line.split_once(' ') else {
            break;
        };
        match vols.attach_instance(&rw_request(inst, vol), &mut |_| Ok(())) {
            Ok(_) => println!("outcome: won"),
            Err(e) => println!("outcome: refused {:?}: {e}", e.kind()),
        }
        std::io::stdout().flush().unwrap();
    }
}

struct Host {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Host {
    fn spawn(root: &std::path::Path) -> Host {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "exclusive::attach_host",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOST, root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut h = Host { child, stdin, out };
        h.line_with("ready");
        h
    }

    /// What follows `marker` on the next output line holding it (the test
    /// harness prints its own text too, on the same line as the first).
    fn line_with(&mut self, marker: &str) -> String {
        loop {
            let mut l = String::new();
            assert!(self.out.read_line(&mut l).unwrap() > 0, "host ended early");
            if let Some((_, rest)) = l.split_once(marker) {
                return rest.trim_end().to_string();
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn one_read_write_attachment_across_hosts() {
    let Some(c) = cluster() else { return };
    let (_spec, root, vols) = rbd_volumes(c, 1 << 30);
    // Each host knows the pool by the same registry record; everything
    // else under its root (instance records) is its own.
    let record = root.path().join("registry/ceph.json");
    assert!(record.is_file(), "no registry record at {record:?}");
    let roots: Vec<_> = (0..2)
        .map(|_| {
            let r = tempfile::tempdir().unwrap();
            std::fs::create_dir(r.path().join("registry")).unwrap();
            std::fs::copy(&record, r.path().join("registry/ceph.json")).unwrap();
            r
        })
        .collect();
    let mut hosts: Vec<Host> = roots.iter().map(|r| Host::spawn(r.path())).collect();
    for round in 0..3 {
        let vol = format!("shared{round}");
        blank_ext4(&vols, &vol, 8 << 20);
        let ids = [format!("a{round}"), format!("b{round}")];
        // Both requests go out back to back; the hosts race for the lock.
        for (h, id) in hosts.iter_mut().zip(&ids) {
            writeln!(h.stdin, "{vol} {id}").unwrap();
        }
        let outs: Vec<String> = hosts.iter_mut().map(|h| h.line_with("outcome: ")).collect();
        let winners: Vec<usize> = (0..2).filter(|&i| outs[i] == "won").collect();
        assert_eq!(winners.len(), 1, "round {round}: {outs:?}");
        let (w, l) = (winners[0], 1 - winners[0]);
        assert!(
            outs[l].starts_with(&format!("refused {:?}", ErrorKind::InUse))
                && outs[l].contains(&ids[w]),
            "round {round}: the loser's refusal does not name {}: {}",
            ids[w],
            outs[l]
        );
        // The volume record holds the winner's attachment only.
        let d = vols.describe_volume("ceph", &vol).unwrap();
        assert!(
            matches!(&d.attachments[..], [a] if a.instance == ids[w] && a.mode == AttachMode::Rw),
            "round {round}: {:?}",
            d.attachments
        );
    }
}
