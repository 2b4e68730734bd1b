//! `vmvol pool …`: storage pools, like `virsh pool-*`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use vmvol::pool::{CapacityPolicy, PoolListing, PoolSpec, Registry, Wait};

use super::{human, parse_size, report, AnyResult, OutputArg};

#[derive(Args)]
pub struct PoolArgs {
    /// Registry directory (default: $VMVOL_ROOT, else the user's data directory).
    #[arg(long, global = true, env = "VMVOL_ROOT")]
    root: Option<PathBuf>,
    /// Fail after this many seconds instead of waiting for another process's lock.
    #[arg(long, global = true)]
    lock_timeout: Option<u64>,
    #[command(subcommand)]
    cmd: PoolCmd,
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Define a pool (creates its directory layout); it starts inactive.
    Define {
        name: String,
        /// Pool directory (default: <root>/pools/<name>).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Put the pool on Ceph RBD: CEPH_POOL[/NAMESPACE] (made by the operator).
        #[cfg(feature = "rbd")]
        #[arg(
            long,
            value_name = "CEPH_POOL[/NAMESPACE]",
            conflicts_with = "path",
            requires = "ceph_conf"
        )]
        rbd: Option<String>,
        /// The Ceph cluster's configuration file (with --rbd).
        #[cfg(feature = "rbd")]
        #[arg(long, value_name = "FILE")]
        ceph_conf: Option<PathBuf>,
        /// The Ceph client id (user) to connect as (with --rbd).
        #[cfg(feature = "rbd")]
        #[arg(long, value_name = "USER", default_value = "admin")]
        ceph_id: String,
        /// Capacity quota, e.g. 500G (default: the filesystem's size).
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
        /// Thin-provisioning ratio: virtual sizes may reach ratio × capacity.
        #[arg(long, default_value_t = 1.0)]
        overcommit: f64,
        /// Activate right away.
        #[arg(long)]
        activate: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List pools.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show a pool's figures.
    Info {
        name: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Allow volume work in a pool.
    Activate { name: String },
    /// Refuse volume work in a pool.
    Deactivate { name: String },
    /// Rescan a pool's files and recompute its figures.
    Refresh {
        name: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Remove an empty pool.
    Undefine { name: String },
}

pub fn run(args: PoolArgs) -> AnyResult<()> {
    let root = args.root.unwrap_or_else(Registry::default_root);
    let reg = Registry::open(&root)?;
    let wait = match args.lock_timeout {
        Some(s) => Wait::Timeout(Duration::from_secs(s)),
        None => Wait::Block,
    };
    match args.cmd {
        PoolCmd::Define {
            name,
            path,
            #[cfg(feature = "rbd")]
            rbd,
            #[cfg(feature = "rbd")]
            ceph_conf,
            #[cfg(feature = "rbd")]
            ceph_id,
            quota,
            overcommit,
            activate,
            out,
        } => {
            let capacity = match quota {
                Some(bytes) => CapacityPolicy::Quota { bytes },
                None => CapacityPolicy::Filesystem,
            };
            #[cfg(feature = "rbd")]
            let rbd_backend = rbd.map(|r| {
                let (pool, namespace) = r.split_once('/').unwrap_or((&r, ""));
                vmvol::pool::BackendSpec::Rbd(vmvol::pool::RbdSpec {
                    conf: ceph_conf.unwrap_or_default(),
                    id: ceph_id,
                    pool: pool.to_string(),
                    namespace: namespace.to_string(),
                })
            });
            #[cfg(not(feature = "rbd"))]
            let rbd_backend: Option<vmvol::pool::BackendSpec> = None;
            let mut cfg = match rbd_backend {
                Some(backend) => reg.define_on(&name, &backend, capacity, overcommit)?,
                None => {
                    let spec = PoolSpec {
                        path,
                        capacity,
                        overcommit_ratio: overcommit,
                    };
                    reg.define(&name, &spec)?
                }
            };
            if activate {
                cfg = reg.activate(&name, wait)?;
            }
            report(out.output, &cfg, |c| {
                println!("Pool {} defined at {} ({:?})", c.name, c.backend, c.state);
            })?;
        }
        PoolCmd::List { out } => {
            let list = reg.list()?;
            report(out.output, &list, |l| {
                println!("{:<24}{:<10}Path", "Name", "State");
                for p in l {
                    match p {
                        PoolListing::Ok(c) => println!(
                            "{:<24}{:<10}{}",
                            c.name,
                            format!("{:?}", c.state).to_lowercase(),
                            c.backend
                        ),
                        PoolListing::Damaged { name, path, reason } => {
                            println!("{name:<24}{:<10}{}: {reason}", "damaged", path.display())
                        }
                    }
                }
            })?;
        }
        PoolCmd::Info { name, out } => {
            let d = reg.info(&name, wait)?;
            report(out.output, &d, |d| {
                println!("Name:        {}", d.config.name);
                println!("UUID:        {}", d.config.uuid);
                println!("Backend:     {}", d.config.backend);
                println!("State:       {:?}", d.config.state);
                println!("Capacity:    {}", human(d.capacity));
                println!(
                    "Limit:       {} (overcommit {})",
                    human(d.limit),
                    d.config.overcommit_ratio
                );
                println!("Allocation:  {}", human(d.allocation));
                println!("Physical:    {}", human(d.physical));
                println!("Available:   {}", human(d.available));
                println!(
                    "Free:        {} on the storage ({} of it reserved for writing)",
                    human(d.fs_available),
                    human(d.physical_reserved)
                );
                println!(
                    "Entries:     {} volumes, {} templates, {} snapshots, {} damaged",
                    d.volumes, d.templates, d.snapshots, d.damaged
                );
            })?;
        }
        PoolCmd::Activate { name } => {
            reg.activate(&name, wait)?;
            println!("Pool {name} activated");
        }
        PoolCmd::Deactivate { name } => {
            reg.deactivate(&name, wait)?;
            println!("Pool {name} deactivated");
        }
        PoolCmd::Refresh { name, out } => {
            let d = reg.refresh(&name, wait)?;
            report(out.output, &d, |d| {
                for r in &d.recovered {
                    println!("recovered: {r:?}");
                }
                println!(
                    "Pool {name} refreshed: allocation {}, physical {}, available {}",
                    human(d.allocation),
                    human(d.physical),
                    human(d.available)
                );
            })?;
        }
        PoolCmd::Undefine { name } => {
            reg.undefine(&name, wait)?;
            println!("Pool {name} undefined");
        }
    }
    Ok(())
}
