//! The pool conformance suite (crates/pool/tests/pool/suite.rs, shared
//! source) run on the RBD backend against the real cluster.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmvol_pool::*;
use vmvol_rbd::{RbdBackend, RbdOptions};

use crate::cluster::{ceph, cluster, namespace, Cluster};
use crate::suite::{Fixture, Harness};

/// Short leases so that lapsing one costs seconds, long enough that a
/// loaded 2-core machine keeps renewing live ones.
pub const LEASE: Duration = Duration::from_secs(4);

pub fn define(spec: &RbdSpec, capacity: CapacityPolicy, ratio: f64) {
    let cfg = PoolConfig::new("p", BackendSpec::Rbd(spec.clone()), capacity, ratio).unwrap();
    let bytes = Record::new(cfg).to_bytes(Path::new("rbd")).unwrap();
    RbdBackend::create(spec, &bytes).unwrap();
}

pub fn open(spec: &RbdSpec) -> Arc<RbdBackend> {
    Arc::new(
        RbdBackend::open(
            spec,
            RbdOptions {
                lease: LEASE,
                ..RbdOptions::default()
            },
        )
        .unwrap(),
    )
}

fn fixture(spec: RbdSpec, capacity: CapacityPolicy, ratio: f64) -> Fixture {
    define(&spec, capacity, ratio);
    let b = open(&spec);
    let pool = Pool::with_backend(b.clone(), Wait::Block).unwrap();
    pool.activate().unwrap();
    let (s1, b2, b3) = (spec.clone(), b.clone(), b.clone());
    Fixture {
        pool,
        reopen: Box::new(move || Pool::with_backend(open(&s1), Wait::Block).unwrap()),
        damage: Box::new(move |kind, id, bytes| b2.put_raw_record(kind, id, bytes).unwrap()),
        lapse_lease: Some(Box::new(move || {
            // As a stalled host: no renewals until the lease is over.
            b3.pause_renewals(true);
            std::thread::sleep(b3.lease() + Duration::from_millis(1500));
            b3.pause_renewals(false);
        })),
        keep: Box::new(b),
    }
}

/// Pools in namespaces of the test cluster's Ceph pool.
pub struct Rbd(pub &'static Cluster);

impl Harness for Rbd {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn pool(&self, capacity: CapacityPolicy, ratio: f64) -> Fixture {
        fixture(namespace(self.0), capacity, ratio)
    }

    fn pool_on_space(&self, space: u64, capacity: Option<u64>, ratio: f64) -> Option<Fixture> {
        // A Ceph pool of its own whose quota is the space.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("q{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let c = self.0;
        ceph(c, "ceph", &["osd", "pool", "create", &name, "8"]);
        ceph(c, "rbd", &["pool", "init", &name]);
        ceph(
            c,
            "ceph",
            &[
                "osd",
                "pool",
                "set-quota",
                &name,
                "max_bytes",
                &space.to_string(),
            ],
        );
        let spec = RbdSpec {
            conf: c.conf.clone(),
            id: "admin".into(),
            pool: name,
            namespace: String::new(),
        };
        let capacity = match capacity {
            Some(bytes) => CapacityPolicy::Quota { bytes },
            None => CapacityPolicy::Filesystem,
        };
        Some(fixture(spec, capacity, ratio))
    }
}

macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        $( #[test] fn $behaviour() {
            let Some(c) = cluster() else { return };
            crate::suite::$behaviour(&Rbd(c))
        } )*
    };
}

conformance!(
    capacity_figures,
    thin_ratio,
    eight_threads_race,
    damaged_records,
    bad_input,
    recovery,
    records_seen_by_other_handles,
    transactions,
    image_store,
    physical_space,
    fencing,
);
