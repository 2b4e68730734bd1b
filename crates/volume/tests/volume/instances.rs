//! Instances (issue 11, attachments): random attach/detach sequences against
//! a reference model of the multi-attach rules, a four-process race for one
//! read-write volume, every refusal with nothing changed, and overlays
//! checked with the real tools. The SIGKILL campaign is in
//! `instances_crash.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use proptest::prelude::*;
use vmvol_pool::{EntryKind, ImageRef, Listed, Registry, Wait};
use vmvol_volume::{
    AttachMode, AttachRequest, AttachTarget, AttachVolume, Attachment, Control, Error, ErrorKind,
    Format, InstanceDescription, InstanceRow, InstanceState, ListFilter, OverlayKind, VolumeRow,
    Volumes,
};

use crate::support::*;

/// Overlay size used by the tests (room for an ext4 journal).
pub const OVL: u64 = 16 * MIB;

/// How a request entry uses its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Rw,
    Ro,
    /// Read-only with a guest-overlayfs overlay.
    Fs,
    /// Read-only with a block (qcow2) overlay.
    Block,
}

impl Use {
    pub fn mode(self) -> AttachMode {
        if self == Use::Rw {
            AttachMode::Rw
        } else {
            AttachMode::Ro
        }
    }
    pub fn overlay(self) -> Option<OverlayKind> {
        match self {
            Use::Fs => Some(OverlayKind::GuestOverlayfs),
            Use::Block => Some(OverlayKind::Block),
            _ => None,
        }
    }
}

/// One request entry.
pub fn entry(pool: &str, volume: &str, path: &str, u: Use) -> AttachVolume {
    AttachVolume {
        pool: Some(pool.into()),
        volume_id: volume.into(),
        mount_path: path.into(),
        readonly: u != Use::Rw,
        overlay: u.overlay().is_some(),
        overlay_size: u.overlay().map(|_| OVL),
        overlay_kind: u.overlay().unwrap_or_default(),
    }
}

pub fn request(id: &str, volumes: Vec<AttachVolume>) -> AttachRequest {
    AttachRequest {
        instance: id.into(),
        volumes,
        vmm: serde_json::json!({ "rootfs": format!("/images/{id}.raw") }),
    }
}

/// Attach with a hook that does nothing.
pub fn attach(v: &Volumes, r: &AttachRequest) -> vmvol_volume::Result<InstanceDescription> {
    v.attach_instance(r, &mut |_| Ok(()))
}

/// Attach with a hook that writes a file into the instance's files
/// directory (like a config disk), so its removal is checked too.
pub fn attach_with_files(
    v: &Volumes,
    r: &AttachRequest,
) -> vmvol_volume::Result<InstanceDescription> {
    v.attach_instance(r, &mut |d| {
        std::fs::create_dir_all(&d.files_dir)
            .and_then(|()| std::fs::write(d.files_dir.join("config.img"), b"config"))
            .map_err(|source| Error::Io {
                object: format!("instance {}", d.instance.id),
                op: "write config disk",
                source,
            })
    })
}

/// Everything a refused request must leave alone: every entry's record,
/// images and sizes, the pools' figures and staging, and the instance
/// record directory.
#[derive(Debug, PartialEq)]
pub struct State {
    pools: Vec<PoolState>,
    instance_files: Vec<String>,
}

/// One entry: kind, id, record, images (name, virtual size, host bytes).
type EntryState = (
    EntryKind,
    String,
    serde_json::Value,
    Vec<(String, Option<u64>, u64)>,
);

#[derive(Debug, PartialEq)]
struct PoolState {
    entries: Vec<EntryState>,
    figures: (u64, u64, u64, usize, usize, usize),
    staging: Vec<String>,
}

pub fn state(root: &Path) -> State {
    let reg = Registry::open(root).unwrap();
    let mut pools = Vec::new();
    for name in ["default", "other"] {
        let p = reg.open_pool(name, Wait::Block).unwrap();
        let d = p.describe().unwrap();
        let mut entries = Vec::new();
        for kind in EntryKind::ALL {
            for l in p.list::<serde_json::Value>(kind, |_, _| true).unwrap() {
                let Listed::Ok(e) = l else {
                    panic!("damaged {l:?}")
                };
                let mut images: Vec<_> = e
                    .images
                    .iter()
                    .map(|i| (i.image.name.clone(), i.virtual_size, i.host_bytes))
                    .collect();
                images.sort();
                entries.push((kind, e.id.clone(), e.record.data.clone(), images));
            }
        }
        entries.sort_by(|a, b| (a.0.to_string(), &a.1).cmp(&(b.0.to_string(), &b.1)));
        pools.push(PoolState {
            entries,
            figures: (
                d.allocation,
                d.virtual_size,
                d.reserved,
                d.volumes,
                d.templates,
                d.snapshots,
            ),
            staging: dir_names(&p.location().join("staging")),
        });
    }
    State {
        pools,
        instance_files: dir_names(&root.join("instances")),
    }
}

pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Attachments and `ovl-*` image names of every volume, by (pool, name).
pub type Attached = BTreeMap<(String, String), (Vec<Attachment>, BTreeSet<String>)>;

pub fn attached(root: &Path) -> Attached {
    let reg = Registry::open(root).unwrap();
    let mut out = BTreeMap::new();
    for pool in ["default", "other"] {
        let p = reg.open_pool(pool, Wait::Block).unwrap();
        for l in p
            .list::<vmvol_volume::VolumeRecord>(EntryKind::Volume, |_, _| true)
            .unwrap()
        {
            let Listed::Ok(e) = l else {
                panic!("damaged {l:?}")
            };
            let mut a = e.record.data.attachments.clone();
            a.sort_by(|x, y| x.instance.cmp(&y.instance));
            let ovl = e
                .images
                .iter()
                .map(|i| i.image.name.clone())
                .filter(|n| n.starts_with("ovl-"))
                .collect();
            out.insert((pool.to_string(), e.record.data.name.clone()), (a, ovl));
        }
    }
    out
}

/// The all-or-nothing invariant after recovery: every instance record is
/// `attached`, each volume carries exactly the attachments and overlay
/// images the records list, and the instance directory holds only files
/// of attached instances.
pub fn assert_all_or_nothing(root: &Path, vols: &Volumes) -> usize {
    let mut want: Attached = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for row in vols.list_instances().unwrap() {
        let InstanceRow::Ok(r) = row else {
            panic!("damaged instance {row:?}")
        };
        assert_eq!(
            r.state,
            InstanceState::Attached,
            "instance {} after recovery",
            r.id
        );
        ids.insert(r.id.clone());
        for v in &r.volumes {
            let slot = want.entry((v.pool.clone(), v.volume.clone())).or_default();
            slot.0.push(Attachment {
                instance: r.id.clone(),
                mount_path: v.mount_path.clone(),
                mode: v.mode,
                overlay: v.overlay.as_ref().map(|o| o.kind),
            });
            if let Some(o) = &v.overlay {
                slot.1.insert(o.image.clone());
            }
        }
    }
    let have = attached(root);
    for (k, (a, o)) in &have {
        let mut w = want.get(k).cloned().unwrap_or_default();
        w.0.sort_by(|x, y| x.instance.cmp(&y.instance));
        assert_eq!((a, o), (&w.0, &w.1), "volume {k:?}");
    }
    for k in want.keys() {
        assert!(have.contains_key(k), "instance lists missing volume {k:?}");
    }
    for f in dir_names(&root.join("instances")) {
        let id = f
            .strip_suffix(".json")
            .or_else(|| f.strip_suffix(".lock"))
            .or_else(|| f.strip_suffix(".d"))
            .unwrap_or_else(|| panic!("stray file {f} in instances/"));
        assert!(
            ids.contains(id),
            "{f} left for an instance that is not attached"
        );
    }
    ids.len()
}

fn check_both(root: &Path, qemu: bool) {
    assert_consistent(root, "default", qemu);
    assert_consistent(root, "other", qemu);
}

// ---------------------------------------------------------------------------
// Property test against a model of the rules.

/// Volumes of the model: (pool, name, format).
const VOLS: [(&str, &str, Format); 5] = [
    ("default", "d0", Format::Qcow2),
    ("default", "d1", Format::Raw),
    ("default", "d2", Format::Qcow2),
    ("other", "o0", Format::Raw),
    ("other", "o1", Format::Qcow2),
];

#[derive(Debug, Clone)]
enum MOp {
    /// Instance, entries (volume index, use, name it by UUID).
    Attach(u8, Vec<(usize, Use, bool)>),
    Detach(u8),
}

fn use_strategy() -> impl Strategy<Value = Use> {
    prop_oneof![
        Just(Use::Rw),
        Just(Use::Ro),
        Just(Use::Fs),
        Just(Use::Block)
    ]
}

fn mop_strategy() -> impl Strategy<Value = MOp> {
    prop_oneof![
        3 => (
            0u8..4,
            proptest::collection::vec((0..VOLS.len(), use_strategy(), proptest::bool::weighted(0.2)), 1..=3)
        )
            .prop_map(|(i, v)| MOp::Attach(i, v)),
        1 => (0u8..4).prop_map(MOp::Detach),
    ]
}

/// The model: instance → its entries (volume index, mount path, use).
type Model = BTreeMap<String, Vec<(usize, String, Use)>>;

/// What the model says an attach does: Ok, or the error kind and the
/// instances the message must name.
fn model_attach(
    m: &Model,
    inst: &str,
    es: &[(usize, Use, bool)],
) -> Result<(), (ErrorKind, Vec<String>)> {
    // check_request: the same volume twice under the same string.
    for (i, e) in es.iter().enumerate() {
        if es[..i].iter().any(|f| f.0 == e.0 && f.2 == e.2) {
            return Err((ErrorKind::InvalidArgument, vec![]));
        }
    }
    if m.contains_key(inst) {
        return Err((ErrorKind::AlreadyExists, vec![]));
    }
    // resolve: pools in name order, entries in request order.
    let mut seen: Vec<usize> = Vec::new();
    for pool in ["default", "other"] {
        for e in es.iter().filter(|e| VOLS[e.0].0 == pool) {
            if seen.contains(&e.0) {
                return Err((ErrorKind::InvalidArgument, vec![]));
            }
            seen.push(e.0);
            let holders: Vec<(&String, Use)> = m
                .iter()
                .flat_map(|(i, vs)| vs.iter().filter(|v| v.0 == e.0).map(move |v| (i, v.2)))
                .collect();
            let named: Vec<String> = match e.1.mode() {
                AttachMode::Rw => holders.iter().map(|h| h.0.clone()).collect(),
                AttachMode::Ro => holders
                    .iter()
                    .filter(|h| h.1 == Use::Rw)
                    .map(|h| h.0.clone())
                    .collect(),
            };
            if !named.is_empty() {
                return Err((ErrorKind::InUse, named));
            }
        }
    }
    Ok(())
}

/// Attachments and the number of overlay images of every volume (overlay
/// names are random; [`assert_all_or_nothing`] ties them to the records).
type View = BTreeMap<(String, String), (Vec<Attachment>, usize)>;

fn view(a: Attached) -> View {
    a.into_iter().map(|(k, (a, o))| (k, (a, o.len()))).collect()
}

fn model_view(m: &Model) -> View {
    let mut out: View = BTreeMap::new();
    for (p, n, _) in VOLS {
        out.insert((p.into(), n.into()), Default::default());
    }
    for (inst, vs) in m {
        for (vi, path, u) in vs {
            let (p, n, _) = VOLS[*vi];
            out.get_mut(&(p.to_string(), n.to_string()))
                .unwrap()
                .0
                .push(Attachment {
                    instance: inst.clone(),
                    mount_path: path.clone(),
                    mode: u.mode(),
                    overlay: u.overlay(),
                });
            if u.overlay().is_some() {
                out.get_mut(&(p.to_string(), n.to_string())).unwrap().1 += 1;
            }
        }
    }
    for v in out.values_mut() {
        v.0.sort_by(|x, y| x.instance.cmp(&y.instance));
    }
    out
}

fn run_model(ops: &[MOp]) {
    let env = Env::new();
    let mut uuid = Vec::new();
    for (p, n, f) in VOLS {
        uuid.push(env.blank(p, n, 8 * MIB, f).id);
    }
    let mut m: Model = BTreeMap::new();
    for op in ops {
        let before = state(&env.root());
        match op {
            MOp::Attach(i, es) => {
                let inst = format!("i{i}");
                let req = request(
                    &inst,
                    es.iter()
                        .enumerate()
                        .map(|(j, (vi, u, by_uuid))| {
                            let (p, n, _) = VOLS[*vi];
                            let id = if *by_uuid {
                                uuid[*vi].clone()
                            } else {
                                n.to_string()
                            };
                            entry(p, &id, &format!("/m{j}"), *u)
                        })
                        .collect(),
                );
                let want = model_attach(&m, &inst, es);
                match (attach(&env.vols, &req), want) {
                    (Ok(d), Ok(())) => {
                        assert_eq!(d.instance.state, InstanceState::Attached);
                        assert_eq!(d.disks.len(), es.len());
                        m.insert(
                            inst.clone(),
                            es.iter()
                                .enumerate()
                                .map(|(j, (vi, u, _))| (*vi, format!("/m{j}"), *u))
                                .collect(),
                        );
                    }
                    (Err(e), Err((kind, named))) => {
                        assert_eq!(e.kind(), kind, "{op:?}: {e}");
                        let msg = e.to_string();
                        for n in named {
                            assert!(msg.contains(&n), "{msg} does not name holder {n}");
                        }
                        assert_eq!(
                            state(&env.root()),
                            before,
                            "refused {op:?} changed something"
                        );
                    }
                    (got, want) => panic!("{op:?}: got {got:?}, model says {want:?}"),
                }
            }
            MOp::Detach(i) => {
                let inst = format!("i{i}");
                let d = env.vols.detach_instance(&inst).unwrap();
                let had = m.remove(&inst).map_or(0, |v| v.len());
                assert_eq!(d.volumes.len(), had);
            }
        }
        assert_eq!(view(attached(&env.root())), model_view(&m), "after {op:?}");
        let listed: BTreeSet<String> = env
            .vols
            .list_instances()
            .unwrap()
            .into_iter()
            .map(|r| match r {
                InstanceRow::Ok(r) => {
                    assert_eq!(r.state, InstanceState::Attached);
                    r.id
                }
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(listed, m.keys().cloned().collect::<BTreeSet<_>>());
        assert_all_or_nothing(&env.root(), &env.vols);
        check_both(&env.root(), false);
    }
    for i in 0..4 {
        env.vols.detach_instance(&format!("i{i}")).unwrap();
    }
    assert_eq!(view(attached(&env.root())), model_view(&BTreeMap::new()));
    assert!(dir_names(&env.root().join("instances")).is_empty());
    check_both(&env.root(), true);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

    #[test]
    fn random_attach_detach_agree_with_the_model(ops in proptest::collection::vec(mop_strategy(), 1..16)) {
        run_model(&ops);
    }
}

// ---------------------------------------------------------------------------
// Four processes race for one read-write volume.

/// Spawns this test binary as a child running `role` of [`child_entry`].
pub fn spawn(role: &str, root: &Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "instances::child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMVOL_TEST_CHILD", role)
        .env("VMVOL_TEST_ROOT", root)
        .env("VMVOL_TEST_ARG", arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The child side (run only as a spawned child; ignored otherwise).
#[test]
#[ignore = "child-process entry of the instance race and crash tests"]
fn child_entry() {
    let role = std::env::var("VMVOL_TEST_CHILD").unwrap_or_default();
    let root = PathBuf::from(std::env::var("VMVOL_TEST_ROOT").unwrap_or_default());
    let arg = std::env::var("VMVOL_TEST_ARG").unwrap_or_default();
    match role.as_str() {
        "attach-rw" => {
            // arg: `ROUND/K`: instance rROUND-K attaches its own volume pK
            // (pool default, applied first) and `shared` (pool other)
            // read-write.
            let (round, k) = arg.split_once('/').unwrap();
            let vols = Volumes::new(Registry::open(&root).unwrap());
            vols.pool("default").unwrap();
            vols.pool("other").unwrap();
            let go = root.join(format!("go{round}"));
            while !go.exists() {
                std::thread::yield_now();
            }
            let r = attach_with_files(
                &vols,
                &request(
                    &format!("r{round}-{k}"),
                    vec![
                        entry("default", &format!("p{k}"), "/private", Use::Rw),
                        entry("other", "shared", "/shared", Use::Rw),
                    ],
                ),
            );
            let mut out = std::io::stdout();
            match r {
                Ok(_) => writeln!(out, "RESULT WON").unwrap(),
                Err(e) => writeln!(out, "RESULT LOST {:?} {e}", e.kind()).unwrap(),
            }
        }
        "attach-ro" => {
            // arg: `ROUND/K`: instance sROUND-K attaches its own pK
            // read-write and `shared` read-only with an overlay of kind K%2.
            let (round, k) = arg.split_once('/').unwrap();
            let vols = Volumes::new(Registry::open(&root).unwrap());
            vols.pool("default").unwrap();
            let go = root.join(format!("go-ro{round}"));
            while !go.exists() {
                std::thread::yield_now();
            }
            let u = if k.parse::<u32>().unwrap() % 2 == 0 {
                Use::Fs
            } else {
                Use::Block
            };
            let r = attach_with_files(
                &vols,
                &request(
                    &format!("s{round}-{k}"),
                    vec![
                        entry("default", &format!("p{k}"), "/private", Use::Rw),
                        entry("other", "shared", "/shared", u),
                    ],
                ),
            );
            let mut out = std::io::stdout();
            match r {
                Ok(_) => writeln!(out, "RESULT WON").unwrap(),
                Err(e) => writeln!(out, "RESULT LOST {:?} {e}", e.kind()).unwrap(),
            }
        }
        "attach-loop" => crate::instances_crash::worker(&root, &arg),
        _ => {}
    }
}

#[test]
fn four_processes_race_for_one_rw_volume_exactly_one_wins() {
    let env = Env::new();
    env.blank("other", "shared", 8 * MIB, Format::Qcow2);
    for k in 0..4 {
        env.blank("default", &format!("p{k}"), 8 * MIB, Format::Raw);
    }
    for round in 0..3 {
        let kids: Vec<_> = (0..4)
            .map(|k| spawn("attach-rw", &env.root(), &format!("{round}/{k}")))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(400));
        std::fs::write(env.root().join(format!("go{round}")), b"").unwrap();
        let outs: Vec<String> = kids
            .into_iter()
            .map(|k| String::from_utf8(k.wait_with_output().unwrap().stdout).unwrap())
            .collect();
        let winners: Vec<usize> = (0..4).filter(|&k| outs[k].contains("RESULT WON")).collect();
        assert_eq!(winners.len(), 1, "{outs:?}");
        let w = winners[0];
        let winner = format!("r{round}-{w}");
        for (k, o) in outs.iter().enumerate().filter(|(k, _)| *k != w) {
            assert!(o.contains("RESULT LOST InUse"), "child {k}: {o}");
            assert!(
                o.contains(&winner),
                "child {k} does not name the winner {winner}: {o}"
            );
        }
        // The winner holds both its volumes; the losers' private volumes
        // (attached before they lost in the other pool) were undone.
        let a = attached(&env.root());
        let holders = |p: &str, n: &str| -> Vec<String> {
            a[&(p.to_string(), n.to_string())]
                .0
                .iter()
                .map(|x| format!("{}:{}", x.instance, x.mode.as_str()))
                .collect()
        };
        assert_eq!(holders("other", "shared"), [format!("{winner}:rw")]);
        for k in 0..4 {
            let want: Vec<String> = if k == w {
                vec![format!("{winner}:rw")]
            } else {
                vec![]
            };
            assert_eq!(holders("default", &format!("p{k}")), want);
        }
        let vols = env.reopen();
        assert_eq!(assert_all_or_nothing(&env.root(), &vols), 1);
        check_both(&env.root(), false);
        vols.detach_instance(&winner).unwrap();
    }
    assert!(attached(&env.root()).values().all(|v| v.0.is_empty()));
    check_both(&env.root(), true);

    // Read-only attachments share: four processes attaching `shared`
    // read-only (with overlays of both kinds) at once all win, and no
    // attachment is lost to a concurrent update.
    let kids: Vec<_> = (0..4)
        .map(|k| spawn("attach-ro", &env.root(), &format!("0/{k}")))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(400));
    std::fs::write(env.root().join("go-ro0"), b"").unwrap();
    for k in kids {
        let o = String::from_utf8(k.wait_with_output().unwrap().stdout).unwrap();
        assert!(o.contains("RESULT WON"), "{o}");
    }
    let a = attached(&env.root());
    let (shared, ovl) = &a[&("other".to_string(), "shared".to_string())];
    assert_eq!(
        shared
            .iter()
            .map(|x| x.instance.as_str())
            .collect::<Vec<_>>(),
        ["s0-0", "s0-1", "s0-2", "s0-3"]
    );
    assert_eq!(ovl.len(), 4);
    let vols = env.reopen();
    assert_eq!(assert_all_or_nothing(&env.root(), &vols), 4);
    check_both(&env.root(), true);
    for k in 0..4 {
        vols.detach_instance(&format!("s0-{k}")).unwrap();
    }
    assert_eq!(assert_all_or_nothing(&env.root(), &vols), 0);
    check_both(&env.root(), true);
}

#[test]
fn four_threads_one_handle_race_for_one_rw_volume() {
    let env = Env::new();
    env.blank("other", "shared", 8 * MIB, Format::Raw);
    for k in 0..4 {
        env.blank("default", &format!("p{k}"), 8 * MIB, Format::Qcow2);
    }
    let vols = std::sync::Arc::new(env.reopen());
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let results: Vec<_> = (0..4)
        .map(|k| {
            let (vols, barrier) = (vols.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                attach(
                    &vols,
                    &request(
                        &format!("t{k}"),
                        vec![
                            entry("default", &format!("p{k}"), "/p", Use::Block),
                            entry("other", "shared", "/s", Use::Rw),
                        ],
                    ),
                )
                .map(|d| d.instance.id)
                .map_err(|e| (e.kind(), e.to_string()))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in &results {
        if let Err((kind, msg)) = r {
            assert_eq!(*kind, ErrorKind::InUse, "{msg}");
            assert!(msg.contains(won[0].as_str()), "{msg}");
        }
    }
    assert_eq!(assert_all_or_nothing(&env.root(), &vols), 1);
    check_both(&env.root(), true);
}

// ---------------------------------------------------------------------------
// Refusals: a specific error each, nothing changed.

fn refused(env: &Env, req: &AttachRequest, kind: ErrorKind, says: &[&str]) {
    let before = state(&env.root());
    let e = attach_with_files(&env.vols, req).unwrap_err();
    assert_eq!(e.kind(), kind, "{e}");
    let msg = e.to_string();
    for s in says {
        assert!(msg.contains(s), "{msg:?} does not say {s:?}");
    }
    assert_eq!(
        state(&env.root()),
        before,
        "refused {req:?} changed something"
    );
}

#[test]
fn every_refusal_says_why_and_changes_nothing() {
    let env = Env::with_quota(96 * MIB);
    env.blank("default", "a", 8 * MIB, Format::Qcow2);
    env.blank("default", "b", 8 * MIB, Format::Raw);
    env.blank("other", "c", 8 * MIB, Format::Qcow2);
    let a_uuid = env.vols.describe_volume("default", "a").unwrap().uuid;
    // An existing instance, so refusals meet attachments and records.
    attach_with_files(
        &env.vols,
        &request("held", vec![entry("other", "c", "/c", Use::Fs)]),
    )
    .unwrap();
    let inv = ErrorKind::InvalidArgument;
    let one = |path: &str| request("x", vec![entry("default", "a", path, Use::Rw)]);
    let two = |p1: &str, p2: &str| {
        request(
            "x",
            vec![
                entry("default", "a", p1, Use::Rw),
                entry("default", "b", p2, Use::Rw),
            ],
        )
    };

    // Mount paths.
    refused(&env, &one("data"), inv, &["entry 1", "must be absolute"]);
    refused(&env, &one(""), inv, &["entry 1", "must be absolute"]);
    for bad in ["/a/../b", "/a//b", "/a/", "/a/./b", "/.."] {
        refused(&env, &one(bad), inv, &["entry 1", "not clean"]);
    }
    refused(&env, &one("/"), inv, &["entry 1", "guest's root"]);
    refused(
        &env,
        &two("/ok", "/x\ny"),
        inv,
        &["entry 2", "control character"],
    );
    for r in vmvol_volume::RESERVED_MOUNT_DIRS {
        for p in [r.to_string(), format!("{r}/sub/dir")] {
            refused(
                &env,
                &two("/ok", &p),
                inv,
                &["entry 2", "belongs to the guest system", r],
            );
        }
    }
    refused(
        &env,
        &two("/same", "/same"),
        inv,
        &["entry 2", "already used by entry 1"],
    );

    // Device count: 12 guest-overlayfs overlays are 24 devices.
    let many = |n: usize, u: Use| {
        request(
            "x",
            (0..n)
                .map(|i| entry("default", &format!("m{i}"), &format!("/m{i}"), u))
                .collect(),
        )
    };
    refused(
        &env,
        &many(12, Use::Fs),
        inv,
        &["24 volume devices", "at most 23"],
    );
    refused(&env, &many(24, Use::Ro), inv, &["24 volume devices"]);
    let mut mixed = many(11, Use::Fs);
    mixed
        .volumes
        .push(entry("default", "m11", "/m11", Use::Block));
    mixed.volumes.push(entry("default", "m12", "/m12", Use::Ro));
    refused(&env, &mixed, inv, &["24 volume devices"]);

    // Overlay arguments.
    let mut e = entry("default", "a", "/a", Use::Fs);
    e.readonly = false;
    refused(
        &env,
        &request("x", vec![e]),
        inv,
        &["entry 1", "readonly=true"],
    );
    for size in [None, Some(0)] {
        let mut e = entry("default", "a", "/a", Use::Block);
        e.overlay_size = size;
        refused(
            &env,
            &request("x", vec![e]),
            inv,
            &["entry 1", "overlay_size > 0"],
        );
    }
    let mut e = entry("default", "a", "/a", Use::Ro);
    e.overlay_size = Some(OVL);
    refused(
        &env,
        &request("x", vec![e]),
        inv,
        &["entry 1", "without overlay=true"],
    );

    // Unknown volume, in either position and pool.
    refused(
        &env,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Rw),
                entry("other", "nope", "/n", Use::Ro),
            ],
        ),
        ErrorKind::NotFound,
        &["nope", "entry 2"],
    );
    refused(
        &env,
        &request("x", vec![entry("nopool", "a", "/a", Use::Ro)]),
        ErrorKind::NotFound,
        &["nopool"],
    );

    // The same volume twice: by name, and by name and UUID.
    refused(
        &env,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Ro),
                entry("default", "a", "/b", Use::Ro),
            ],
        ),
        inv,
        &["entry 2", "already attached by entry 1"],
    );
    refused(
        &env,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Ro),
                entry("default", &a_uuid, "/b", Use::Ro),
            ],
        ),
        inv,
        &["entry 2", "same volume as entry 1"],
    );
    // The default pool named and left implicit is the same pool.
    let mut implicit = entry("default", "a", "/b", Use::Ro);
    implicit.pool = None;
    refused(
        &env,
        &request("x", vec![entry("default", "a", "/a", Use::Ro), implicit]),
        inv,
        &["entry 2", "already attached by entry 1"],
    );
    // Overlay sizes the pool cannot hold as an image.
    let mut odd = entry("default", "a", "/a", Use::Fs);
    odd.overlay_size = Some(OVL + 1);
    refused(
        &env,
        &request("x", vec![odd]),
        inv,
        &["entry 1", "multiple of 512"],
    );

    // A second attach of an existing instance (no hot-attach), even of
    // another volume.
    refused(
        &env,
        &request("held", vec![entry("default", "a", "/a", Use::Ro)]),
        ErrorKind::AlreadyExists,
        &["instance held"],
    );

    // A rule: read-write cannot join the read-only holder.
    refused(
        &env,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Rw),
                entry("other", "c", "/c", Use::Rw),
            ],
        ),
        ErrorKind::InUse,
        &["held (ro)", "exclusive"],
    );

    // Bad instance ids.
    for bad in ["", ".x", "a/b", &"x".repeat(64)] {
        refused(
            &env,
            &request(bad, vec![entry("default", "a", "/a", Use::Ro)]),
            inv,
            &["instance"],
        );
    }

    // An inactive pool (an inactive pool cannot be listed: compare with
    // it active again).
    let before = state(&env.root());
    env.vols
        .registry()
        .deactivate("other", Wait::Block)
        .unwrap();
    let e = attach_with_files(
        &env.vols,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Rw),
                entry("other", "c", "/c", Use::Ro),
            ],
        ),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(
        e.to_string().contains("pool other") && e.to_string().contains("inactive"),
        "{e}"
    );
    env.vols.registry().activate("other", Wait::Block).unwrap();
    assert_eq!(
        state(&env.root()),
        before,
        "refused on an inactive pool changed something"
    );

    // A hook error undoes every volume of both pools, the overlays and the
    // files the hook wrote.
    let before = state(&env.root());
    let req = request(
        "x",
        vec![
            entry("default", "a", "/a", Use::Block),
            entry("default", "b", "/b", Use::Fs),
            entry("other", "c", "/c", Use::Ro),
        ],
    );
    let mut files_dir = None;
    let e = env
        .vols
        .attach_instance(&req, &mut |d| {
            // Everything is in place when the hook runs.
            assert_eq!(d.disks.len(), 3);
            assert!(d.disks[1].overlay_target.is_some());
            std::fs::create_dir_all(&d.files_dir).unwrap();
            std::fs::write(d.files_dir.join("config.img"), b"x").unwrap();
            files_dir = Some(d.files_dir.clone());
            Err(Error::Refused {
                object: "instance x".into(),
                op: "build config disk",
                reason: "the test says no".into(),
            })
        })
        .unwrap_err();
    assert!(e.to_string().contains("the test says no"), "{e}");
    assert!(!files_dir.unwrap().exists());
    assert_eq!(state(&env.root()), before, "hook error left something");

    // An overlay that does not fit pool other's quota (96 MiB, 16 MiB
    // used): pool default's volumes (attached first) are undone.
    let mut big = entry("other", "c", "/c", Use::Fs);
    big.overlay_size = Some(128 * MIB);
    refused(
        &env,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Rw),
                entry("default", "b", "/b", Use::Block),
                big,
            ],
        ),
        ErrorKind::InsufficientSpace,
        &[],
    );

    // And after all that, the same instance id attaches fine.
    let d = attach_with_files(
        &env.vols,
        &request(
            "x",
            vec![
                entry("default", "a", "/a", Use::Rw),
                entry("other", "c", "/c", Use::Block),
            ],
        ),
    )
    .unwrap();
    assert_eq!(d.instance.state, InstanceState::Attached);
    assert_all_or_nothing(&env.root(), &env.vols);
    check_both(&env.root(), true);
    for i in ["x", "held"] {
        env.vols.detach_instance(i).unwrap();
    }
    assert!(dir_names(&env.root().join("instances")).is_empty());
    check_both(&env.root(), true);
}

#[test]
fn twenty_three_devices_attach_and_detach() {
    let env = Env::new();
    for i in 0..12 {
        env.blank("default", &format!("m{i}"), 8 * MIB, Format::Qcow2);
    }
    // 11 guest-overlayfs overlays (22 devices) and one plain volume.
    let mut req = request(
        "big",
        (0..11)
            .map(|i| entry("default", &format!("m{i}"), &format!("/m{i}"), Use::Fs))
            .collect(),
    );
    req.volumes.push(entry("default", "m11", "/m11", Use::Rw));
    let d = attach(&env.vols, &req).unwrap();
    assert_eq!(
        d.disks
            .iter()
            .map(|x| 1 + usize::from(x.overlay_target.is_some()))
            .sum::<usize>(),
        vmvol_volume::MAX_VOLUME_DEVICES
    );
    assert_eq!(assert_all_or_nothing(&env.root(), &env.vols), 1);
    check_both(&env.root(), false);
    let done = env.vols.detach_instance("big").unwrap();
    assert_eq!(done.volumes.len(), 12);
    // Idempotent.
    assert!(env.vols.detach_instance("big").unwrap().volumes.is_empty());
    assert_eq!(assert_all_or_nothing(&env.root(), &env.vols), 0);
    check_both(&env.root(), false);
}

// ---------------------------------------------------------------------------
// Overlays against the real tools.

fn file(t: &AttachTarget) -> PathBuf {
    match t {
        AttachTarget::File { path, .. } => path.clone(),
        other => panic!("not a file: {other:?}"),
    }
}

#[test]
fn overlays_are_private_clean_and_removed_at_detach() {
    let env = Env::new();
    let blank_ext4 = |pool: &str, name: &str, format| {
        env.vols
            .create_volume(
                pool,
                &vmvol_volume::CreateVolume {
                    name: name.into(),
                    size: Some(32 * MIB),
                    source: vmvol_volume::VolumeSource::Blank {
                        format,
                        prealloc: vmvol_volume::Prealloc::Off,
                        ext4: true,
                    },
                },
                &Control::new(),
            )
            .unwrap()
    };
    blank_ext4("default", "base", Format::Qcow2);
    blank_ext4("other", "rawbase", Format::Raw);
    env.write("default", "base", 40 << 10, b"base data");
    let base = env.path("default", "base");
    let rawbase = env.path("other", "rawbase");
    let keep = tempfile::tempdir().unwrap();
    let base_copy = keep.path().join("base-copy.qcow2");
    let rawbase_copy = keep.path().join("rawbase-copy.raw");
    std::fs::copy(&base, &base_copy).unwrap();
    std::fs::copy(&rawbase, &rawbase_copy).unwrap();

    // A: guest overlayfs over base, block over rawbase. B: block over
    // base, guest overlayfs over rawbase. Both share the bases read-only.
    let a = attach(
        &env.vols,
        &request(
            "a",
            vec![
                entry("default", "base", "/data", Use::Fs),
                entry("other", "rawbase", "/raw", Use::Block),
            ],
        ),
    )
    .unwrap();
    let b = attach(
        &env.vols,
        &request(
            "b",
            vec![
                entry("default", "base", "/data", Use::Block),
                entry("other", "rawbase", "/raw", Use::Fs),
            ],
        ),
    )
    .unwrap();
    assert_all_or_nothing(&env.root(), &env.vols);
    check_both(&env.root(), true);
    // Described again from the record: the same targets.
    assert_eq!(env.vols.describe_instance("a").unwrap().disks, a.disks);

    let mut overlay_files = Vec::new();
    for (d, fs_disk, block_disk, block_base) in [(&a, 0, 1, &rawbase), (&b, 1, 0, &base)] {
        // Guest overlayfs: the base is the device, plus a sparse raw ext4 disk.
        let fs = &d.disks[fs_disk];
        assert_eq!(fs.volume.mode, AttachMode::Ro);
        let ovl = file(fs.overlay_target.as_ref().unwrap());
        assert!(ovl
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ovl-"));
        let meta = std::fs::metadata(&ovl).unwrap();
        assert_eq!(meta.len(), OVL, "overlay size");
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < OVL / 2,
            "overlay not sparse: {} blocks",
            meta.blocks()
        );
        e2fsck_clean(&ovl);
        overlay_files.push(ovl);
        // Block: one qcow2 device whose backing is the base.
        let blk = &d.disks[block_disk];
        assert!(blk.overlay_target.is_none());
        let q = file(&blk.target);
        assert_ne!(&q, block_base);
        qemu_check(&q);
        if require_tool("qemu-img") {
            let info = run(
                "qemu-img",
                &[
                    "info",
                    "--backing-chain",
                    "--output=json",
                    q.to_str().unwrap(),
                ],
            );
            let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
            let chain = chain.as_array().unwrap();
            assert_eq!(chain.len(), 2, "{info}");
            assert_eq!(chain[0]["format"], "qcow2");
            let bf = chain[0]["full-backing-filename"]
                .as_str()
                .or(chain[0]["backing-filename"].as_str())
                .unwrap();
            assert_eq!(
                std::fs::canonicalize(q.parent().unwrap().join(bf)).unwrap(),
                std::fs::canonicalize(block_base).unwrap()
            );
            assert_eq!(chain[0]["virtual-size"], chain[1]["virtual-size"]);
        }
        overlay_files.push(q);
    }

    // Each instance writes into its overlays through the pool.
    for (d, tag) in [(&a, b"AAAA"), (&b, b"BBBB")] {
        for disk in &d.disks {
            let o = disk.volume.overlay.as_ref().unwrap();
            let p = env.vols.pool(&disk.volume.pool).unwrap();
            let r = ImageRef::entry(
                EntryKind::Volume,
                &disk.volume.volume_id,
                &o.image,
                o.format(),
            );
            let io = p.open_image(&r, true).unwrap();
            io.write_at(&tag.repeat(1024), 40 << 10).unwrap();
            io.flush().unwrap();
            let mut back = vec![0u8; 4];
            io.read_at(&mut back, 40 << 10).unwrap();
            assert_eq!(&back, tag);
        }
    }
    // The bases are unchanged; the block overlays differ from them.
    qemu_compare(&base, &base_copy);
    qemu_compare(&rawbase, &rawbase_copy);
    assert_eq!(env.read("default", "base", 40 << 10, 9), b"base data");
    if require_tool("qemu-img") {
        assert!(qemu_differ(&overlay_files[3], &base));
        assert!(qemu_differ(&overlay_files[1], &rawbase));
        // And from each other: the writes of one instance are invisible to
        // the other.
        let a_blk = file(&a.disks[1].target);
        let b_fs = file(b.disks[1].overlay_target.as_ref().unwrap());
        let mut buf = vec![0u8; 4];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&b_fs)
            .unwrap()
            .read_exact_at(&mut buf, 40 << 10)
            .unwrap();
        assert_eq!(&buf, b"BBBB");
        let raw = to_raw(&a_blk, keep.path());
        std::fs::File::open(&raw)
            .unwrap()
            .read_exact_at(&mut buf, 40 << 10)
            .unwrap();
        assert_eq!(&buf, b"AAAA");
    }
    for q in [&overlay_files[1], &overlay_files[3]] {
        qemu_check(q);
    }

    // Listed with their instances, refused for delete/snapshot/compress.
    let listed = |attached: bool| -> Vec<(String, Vec<String>)> {
        env.vols
            .list_volumes(&ListFilter {
                attached: Some(attached),
                ..ListFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|r| match r {
                VolumeRow::Ok {
                    name, attached_to, ..
                } => (name, attached_to),
                d => panic!("{d:?}"),
            })
            .collect()
    };
    let ab = vec!["a".to_string(), "b".to_string()];
    assert_eq!(
        listed(true),
        [
            ("base".to_string(), ab.clone()),
            ("rawbase".to_string(), ab.clone())
        ]
    );
    assert!(listed(false).is_empty());
    let desc = env.vols.describe_volume("default", "base").unwrap();
    let mut who: Vec<_> = desc
        .attachments
        .iter()
        .map(|x| x.instance.clone())
        .collect();
    who.sort();
    assert_eq!(who, ab);
    let before = state(&env.root());
    let errs = [
        env.vols.delete_volume("default", "base").unwrap_err(),
        env.vols.delete_volume("other", "rawbase").unwrap_err(),
        env.vols
            .create_snapshot("default", "s", "base", &Control::new())
            .unwrap_err(),
        env.vols
            .compress_volume("default", "base", None, &Control::new())
            .unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        let m = e.to_string();
        assert!(
            m.contains("attached to instance(s) a, b")
                || m.contains("attached to instance(s) b, a"),
            "{m}"
        );
    }
    assert_eq!(state(&env.root()), before);

    // Detach: overlays gone, figures equal a rescan, listing follows.
    env.vols.detach_instance("a").unwrap();
    assert_eq!(
        listed(true),
        [
            ("base".to_string(), vec!["b".to_string()]),
            ("rawbase".to_string(), vec!["b".to_string()])
        ]
    );
    check_both(&env.root(), true);
    env.vols.detach_instance("b").unwrap();
    for f in &overlay_files {
        assert!(!f.exists(), "{} left after detach", f.display());
    }
    assert!(listed(true).is_empty());
    assert_eq!(listed(false).len(), 2);
    assert_all_or_nothing(&env.root(), &env.vols);
    check_both(&env.root(), true);
    qemu_compare(&base, &base_copy);
    qemu_compare(&rawbase, &rawbase_copy);
    // Detached: the refused operations work again.
    env.vols
        .create_snapshot("default", "s", "base", &Control::new())
        .unwrap();
    env.vols.delete_volume("other", "rawbase").unwrap();
    check_both(&env.root(), true);
}

#[test]
fn block_overlay_over_a_linked_volume_follows_the_whole_chain() {
    let env = Env::new();
    env.vols
        .create_volume(
            "default",
            &vmvol_volume::CreateVolume {
                name: "golden".into(),
                size: Some(32 * MIB),
                source: vmvol_volume::VolumeSource::Blank {
                    format: Format::Qcow2,
                    prealloc: vmvol_volume::Prealloc::Off,
                    ext4: true,
                },
            },
            &Control::new(),
        )
        .unwrap();
    env.write("default", "golden", 1 << 20, b"golden");
    env.vols
        .create_template_from_volume("default", "tpl", "golden", &Control::new())
        .unwrap();
    env.linked_or_full("default", "web", "tpl", vmvol_volume::LinkMode::Linked);
    let web = env.path("default", "web");
    let keep = tempfile::tempdir().unwrap();
    let web_copy = to_raw(&web, keep.path());
    let a = attach(
        &env.vols,
        &request("a", vec![entry("default", "web", "/web", Use::Block)]),
    )
    .unwrap();
    let b = attach(
        &env.vols,
        &request("b", vec![entry("default", "web", "/web", Use::Fs)]),
    )
    .unwrap();
    let q = file(&a.disks[0].target);
    assert_eq!(file(&b.disks[0].target), web);
    if require_tool("qemu-img") {
        // overlay -> web -> template: the VMM follows three images.
        let info = run(
            "qemu-img",
            &[
                "info",
                "--backing-chain",
                "--output=json",
                q.to_str().unwrap(),
            ],
        );
        let chain: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(chain.as_array().unwrap().len(), 3, "{info}");
        run("qemu-img", &["check", q.to_str().unwrap()]);
        // The overlay shows the template's data until it is written.
        let raw = to_raw(&q, keep.path());
        qemu_compare(&raw, &web_copy);
    }
    // A writes through its overlay; web and the template are unchanged.
    let o = a.disks[0].volume.overlay.clone().unwrap();
    let p = env.vols.pool("default").unwrap();
    let io = p
        .open_image(
            &ImageRef::entry(
                EntryKind::Volume,
                &a.disks[0].volume.volume_id,
                &o.image,
                o.format(),
            ),
            true,
        )
        .unwrap();
    io.write_at(b"instance a", 1 << 20).unwrap();
    io.flush().unwrap();
    drop(io);
    let mut back = vec![0u8; 10];
    p.open_image(
        &ImageRef::entry(
            EntryKind::Volume,
            &a.disks[0].volume.volume_id,
            &o.image,
            o.format(),
        ),
        false,
    )
    .unwrap()
    .read_at(&mut back, 1 << 20)
    .unwrap();
    assert_eq!(&back, b"instance a");
    assert_eq!(env.read("default", "web", 1 << 20, 6), b"golden");
    qemu_compare(&web, &web_copy);
    qemu_check(&q);
    check_both(&env.root(), true);
    // The template cannot go while web exists; web cannot go while attached.
    assert_eq!(
        env.vols.delete_volume("default", "web").unwrap_err().kind(),
        ErrorKind::InUse
    );
    for i in ["a", "b"] {
        env.vols.detach_instance(i).unwrap();
    }
    assert!(!q.exists());
    qemu_compare(&web, &web_copy);
    check_both(&env.root(), true);
    env.vols.delete_volume("default", "web").unwrap();
    check_both(&env.root(), true);
}
