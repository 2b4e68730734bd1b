//! The timing figures on the volume layer over an RBD pool: linked
//! create from a template of a 100 GiB ext4 volume, and a snapshot of the
//! linked volume (medians of a few runs, printed for docs/performance.md
//! with the load average). The bounds asserted are loose sanity bounds
//! (50–100× the targets) so a loaded machine does not fail them; the
//! figures are what counts.

use std::time::{Duration, Instant};

use vmvol_format::Control;
use vmvol_volume::{CreateVolume, LinkMode, VolumeSource};

use crate::cluster::cluster;
use crate::compress::{blank_ext4, rbd_volumes};

const RUNS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

#[test]
fn linked_create_and_snapshot_timing_on_rbd() {
    let Some(c) = cluster() else { return };
    let (_spec, _root, vols) = rbd_volumes(c, 4 << 30);
    let ctl = Control::new();
    let t0 = Instant::now();
    blank_ext4(&vols, "big", 100 << 30);
    let mkfs = t0.elapsed();
    let t0 = Instant::now();
    vols.create_template_from_volume("ceph", "tpl", "big", &ctl)
        .unwrap();
    let tpl = t0.elapsed();
    let mut linked = Vec::new();
    let mut snap = Vec::new();
    for i in 0..RUNS {
        let name = format!("l{i}");
        let t0 = Instant::now();
        vols.create_volume(
            "ceph",
            &CreateVolume {
                name: name.clone(),
                size: None,
                source: VolumeSource::Template {
                    name: "tpl".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap();
        linked.push(t0.elapsed());
        let t0 = Instant::now();
        vols.create_snapshot("ceph", &format!("s{i}"), &name, &ctl)
            .unwrap();
        snap.push(t0.elapsed());
    }
    let (l, s) = (median(linked.clone()), median(snap.clone()));
    eprintln!(
        "rbd timing (load {}): 100 GiB ext4 create {mkfs:?}, template {tpl:?}; \
         linked create median {l:?} of {linked:?}; snapshot median {s:?} of {snap:?}",
        load().trim()
    );
    assert!(l < Duration::from_secs(5), "linked create {l:?}");
    assert!(s < Duration::from_secs(5), "snapshot {s:?}");
}
