//! Random operation sequences against a simple reference model of volumes,
//! templates, snapshots and their dependency edges (also the operation
//! generator of the crash campaign).

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmvol_volume::{
    Control, CreateVolume, ErrorKind, Format, LinkMode, ListFilter, NewSize, Prealloc, VolumeRow,
    VolumeSource, Volumes,
};

use crate::support::*;

/// One operation (names drawn from small sets so they collide).
#[derive(Debug, Clone)]
pub enum Op {
    Blank(u8, bool),
    FromTemplate(u8, u8, bool),
    FromSnapshot(u8, u8, bool),
    Delete(u8),
    Template(u8, u8),
    DeleteTemplate(u8),
    Snapshot(u8, u8),
    DeleteSnapshot(u8, bool),
    Clone(u8, u8, bool),
    Resize(u8),
    Compress(u8),
    /// A blank ext4 qcow2 volume (mkfs in staging).
    Ext4(u8),
    /// An ext4 volume from the tar archive `archive.tar` beside the registry.
    Archive(u8, std::path::PathBuf),
}

pub fn op_strategy() -> impl Strategy<Value = Op> {
    let n = 0u8..4;
    prop_oneof![
        (n.clone(), any::<bool>()).prop_map(|(a, b)| Op::Blank(a, b)),
        (n.clone(), 0u8..2, any::<bool>()).prop_map(|(a, b, c)| Op::FromTemplate(a, b, c)),
        (n.clone(), 0u8..3, any::<bool>()).prop_map(|(a, b, c)| Op::FromSnapshot(a, b, c)),
        n.clone().prop_map(Op::Delete),
        (0u8..2, n.clone()).prop_map(|(a, b)| Op::Template(a, b)),
        (0u8..2).prop_map(Op::DeleteTemplate),
        (0u8..3, n.clone()).prop_map(|(a, b)| Op::Snapshot(a, b)),
        (0u8..3, any::<bool>()).prop_map(|(a, b)| Op::DeleteSnapshot(a, b)),
        (n.clone(), n.clone(), any::<bool>()).prop_map(|(a, b, c)| Op::Clone(a, b, c)),
        n.clone().prop_map(Op::Resize),
        n.clone().prop_map(Op::Compress),
        n.clone().prop_map(Op::Ext4),
    ]
}

fn v(i: u8) -> String {
    format!("v{i}")
}
fn t(i: u8) -> String {
    format!("t{i}")
}
fn s(i: u8) -> String {
    format!("s{i}")
}

/// Runs `op` on pool `default` (clones may go to `other`).
pub fn apply(vols: &Volumes, op: &Op) -> Result<(), ErrorKind> {
    let ctl = Control::new();
    let mk = |name: String, source| {
        vols.create_volume(
            "default",
            &CreateVolume {
                name,
                size: None,
                source,
            },
            &ctl,
        )
        .map(drop)
    };
    let mode = |l: bool| if l { LinkMode::Linked } else { LinkMode::Full };
    let r = match op {
        Op::Blank(i, q) => vols
            .create_volume(
                "default",
                &CreateVolume {
                    name: v(*i),
                    size: Some(MIB),
                    source: VolumeSource::Blank {
                        format: if *q { Format::Qcow2 } else { Format::Raw },
                        prealloc: Prealloc::Off,
                        ext4: false,
                    },
                },
                &ctl,
            )
            .map(drop),
        Op::FromTemplate(i, j, l) => mk(
            v(*i),
            VolumeSource::Template {
                name: t(*j),
                mode: mode(*l),
            },
        ),
        Op::FromSnapshot(i, j, l) => mk(
            v(*i),
            VolumeSource::Snapshot {
                name: s(*j),
                mode: mode(*l),
            },
        ),
        Op::Delete(i) => vols.delete_volume("default", &v(*i)),
        Op::Template(j, i) => vols
            .create_template_from_volume("default", &t(*j), &v(*i), &ctl)
            .map(drop),
        Op::DeleteTemplate(j) => vols.delete_template("default", &t(*j)),
        Op::Snapshot(j, i) => vols
            .create_snapshot("default", &s(*j), &v(*i), &ctl)
            .map(drop),
        Op::DeleteSnapshot(j, m) => vols.delete_snapshot("default", &s(*j), *m),
        Op::Clone(i, k, other) => vols
            .clone_volume("default", &v(*i), &v(*k), other.then_some("other"), &ctl)
            .map(drop),
        Op::Ext4(i) => vols
            .create_volume(
                "default",
                &CreateVolume {
                    name: v(*i),
                    size: Some(32 * MIB),
                    source: VolumeSource::Blank {
                        format: Format::Qcow2,
                        prealloc: Prealloc::Off,
                        ext4: true,
                    },
                },
                &ctl,
            )
            .map(drop),
        Op::Archive(i, path) => mk(v(*i), VolumeSource::Archive { path: path.clone() }),
        Op::Resize(i) => vols
            .resize_volume("default", &v(*i), NewSize::Grow(MIB))
            .map(drop),
        Op::Compress(i) => vols
            .compress_volume("default", &v(*i), None, &ctl)
            .map(drop),
    };
    r.map_err(|e| e.kind())
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Model {
    /// name -> (format, base "t0"/"s1")
    vols: BTreeMap<String, (Format, Option<String>)>,
    other: BTreeMap<String, Format>,
    tpls: BTreeMap<String, Format>,
    /// name -> (format, base)
    snaps: BTreeMap<String, (Format, Option<String>)>,
}

impl Model {
    fn deps(&self, base: &str) -> bool {
        self.vols.values().any(|x| x.1.as_deref() == Some(base))
            || self.snaps.values().any(|x| x.1.as_deref() == Some(base))
    }

    fn apply(&mut self, op: &Op) -> Result<(), ErrorKind> {
        use ErrorKind::*;
        match op {
            Op::Blank(i, q) => {
                if self.vols.contains_key(&v(*i)) {
                    return Err(AlreadyExists);
                }
                self.vols
                    .insert(v(*i), (if *q { Format::Qcow2 } else { Format::Raw }, None));
            }
            Op::Ext4(i) | Op::Archive(i, _) => {
                if self.vols.contains_key(&v(*i)) {
                    return Err(AlreadyExists);
                }
                self.vols.insert(v(*i), (Format::Qcow2, None));
            }
            Op::FromTemplate(i, j, l) => {
                if self.vols.contains_key(&v(*i)) {
                    return Err(AlreadyExists);
                }
                let f = *self.tpls.get(&t(*j)).ok_or(NotFound)?;
                let e = if *l {
                    (Format::Qcow2, Some(t(*j)))
                } else {
                    (f, None)
                };
                self.vols.insert(v(*i), e);
            }
            Op::FromSnapshot(i, j, l) => {
                if self.vols.contains_key(&v(*i)) {
                    return Err(AlreadyExists);
                }
                let f = self.snaps.get(&s(*j)).ok_or(NotFound)?.0;
                let e = if *l {
                    (Format::Qcow2, Some(s(*j)))
                } else {
                    (f, None)
                };
                self.vols.insert(v(*i), e);
            }
            Op::Delete(i) => {
                self.vols.remove(&v(*i)).ok_or(NotFound)?;
            }
            Op::Template(j, i) => {
                if self.tpls.contains_key(&t(*j)) {
                    return Err(AlreadyExists);
                }
                let f = self.vols.get(&v(*i)).ok_or(NotFound)?.0;
                self.tpls.insert(t(*j), f);
            }
            Op::DeleteTemplate(j) => {
                if !self.tpls.contains_key(&t(*j)) {
                    return Err(NotFound);
                }
                if self.deps(&t(*j)) {
                    return Err(HasDependents);
                }
                self.tpls.remove(&t(*j));
            }
            Op::Snapshot(j, i) => {
                if self.snaps.contains_key(&s(*j)) {
                    return Err(AlreadyExists);
                }
                let vol = self.vols.get_mut(&v(*i)).ok_or(NotFound)?;
                if vol.0 == Format::Qcow2 {
                    let base = vol.1.replace(s(*j));
                    self.snaps.insert(s(*j), (Format::Qcow2, base));
                } else {
                    self.snaps.insert(s(*j), (Format::Raw, None));
                }
            }
            Op::DeleteSnapshot(j, m) => {
                let snap = self.snaps.get(&s(*j)).ok_or(NotFound)?.clone();
                if self.deps(&s(*j)) && !m {
                    return Err(HasDependents);
                }
                let me = Some(s(*j));
                for x in self
                    .vols
                    .values_mut()
                    .map(|x| &mut x.1)
                    .chain(self.snaps.values_mut().map(|x| &mut x.1))
                {
                    if *x == me {
                        *x = snap.1.clone();
                    }
                }
                self.snaps.remove(&s(*j));
            }
            Op::Clone(i, k, other) => {
                let f = self.vols.get(&v(*i)).ok_or(NotFound)?.0;
                if *other {
                    if self.other.contains_key(&v(*k)) {
                        return Err(AlreadyExists);
                    }
                    self.other.insert(v(*k), f);
                } else {
                    if self.vols.contains_key(&v(*k)) {
                        return Err(AlreadyExists);
                    }
                    self.vols.insert(v(*k), (f, None));
                }
            }
            Op::Resize(i) | Op::Compress(i) => {
                let f = self.vols.get(&v(*i)).ok_or(NotFound)?.0;
                if matches!(op, Op::Compress(_)) && f == Format::Raw {
                    return Err(Refused);
                }
            }
        }
        Ok(())
    }

    /// What the library lists, in the model's terms.
    fn observe(vols: &Volumes) -> Model {
        let mut m = Model::default();
        for (pool, map) in [("default", true), ("other", false)] {
            for r in vols
                .list_volumes(&ListFilter {
                    pool: Some(pool.into()),
                    ..ListFilter::default()
                })
                .unwrap()
            {
                let VolumeRow::Ok {
                    name, format, base, ..
                } = r
                else {
                    panic!("damaged {r:?}")
                };
                if map {
                    m.vols.insert(name, (format, base.map(|b| b.name)));
                } else {
                    m.other.insert(name, format);
                }
            }
        }
        for t in vols.list_templates("default").unwrap() {
            let vmvol_volume::Row::Ok(t) = t else {
                panic!("damaged")
            };
            m.tpls.insert(t.record.name, t.record.format);
        }
        for s in vols.list_snapshots("default", None).unwrap() {
            let vmvol_volume::Row::Ok(s) = s else {
                panic!("damaged")
            };
            m.snaps.insert(
                s.record.name,
                (s.record.format, s.record.base.map(|b| b.name)),
            );
        }
        m
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_agree_with_the_model(ops in proptest::collection::vec(op_strategy(), 1..14)) {
        let env = Env::new();
        let mut model = Model::default();
        for op in &ops {
            let want = model.apply(op);
            let got = apply(&env.vols, op);
            prop_assert_eq!(got, want, "op {:?}", op);
            prop_assert_eq!(&Model::observe(&env.vols), &model, "after {:?}", op);
        }
        assert_consistent(&env.root(), "default", false);
        assert_consistent(&env.root(), "other", false);
    }
}
