//! `vmvol volume …`: volumes in pools (create, list, describe, resize,
//! clone, compress, delete).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use vmvol::format::{Format, Prealloc};
use vmvol::instance::VolumeResized;
use vmvol::pool::{AttachTarget, Registry, Wait};
use vmvol::volume::{
    CreateVolume, LinkMode, ListFilter, NewSize, SortKey, VolumeRow, VolumeSource, Volumes,
};

use super::image::{CompressionArg, PreallocArg};
use super::output::progress_control;
use super::{human, parse_size, report, AnyResult, OutputArg};

/// Options every volume, template and snapshot command takes.
#[derive(Args)]
pub struct Common {
    /// Registry directory (default: $VMVOL_ROOT, else the user's data directory).
    #[arg(long, global = true, env = "VMVOL_ROOT")]
    pub root: Option<PathBuf>,
    /// Fail after this many seconds instead of waiting for another process's lock.
    #[arg(long, global = true)]
    pub lock_timeout: Option<u64>,
}

impl Common {
    /// The volume layer over the registry.
    pub fn volumes(&self) -> AnyResult<Volumes> {
        let root = self.root.clone().unwrap_or_else(Registry::default_root);
        let wait = match self.lock_timeout {
            Some(s) => Wait::Timeout(Duration::from_secs(s)),
            None => Wait::Block,
        };
        Ok(Volumes::with_wait(Registry::open(&root)?, wait))
    }
}

#[derive(Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: VolumeCmd,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume: blank (--size), from an archive, a template or a snapshot.
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        /// Virtual size, e.g. 10G (required for blank volumes).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Format of a blank volume.
        #[arg(short = 'f', long = "format", default_value = "qcow2")]
        format: Format,
        /// Raw preallocation of a blank volume.
        #[arg(long, value_enum, default_value = "off")]
        prealloc: PreallocArg,
        /// Format a blank volume with ext4.
        #[arg(long)]
        ext4: bool,
        /// A tar or tar.gz archive whose tree the new ext4 volume holds.
        #[arg(long, conflicts_with_all = ["from_template", "from_snapshot", "ext4"])]
        from_archive: Option<PathBuf>,
        /// Template to make the volume from (linked unless --full).
        #[arg(long, conflicts_with_all = ["from_snapshot", "ext4"])]
        from_template: Option<String>,
        /// Snapshot to make the volume from (linked unless --full).
        #[arg(long, conflicts_with = "ext4")]
        from_snapshot: Option<String>,
        /// An independent full copy instead of a linked overlay.
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List volumes (all pools unless --pool).
    List {
        #[arg(long)]
        pool: Option<String>,
        /// Only attached volumes.
        #[arg(long, conflicts_with = "available")]
        attached: bool,
        /// Only volumes attached nowhere.
        #[arg(long)]
        available: bool,
        /// Only this format.
        #[arg(long)]
        format: Option<Format>,
        /// Case-insensitive substring of the name.
        #[arg(long)]
        name: Option<String>,
        /// Sort by name, created, size or pool.
        #[arg(long, default_value = "name")]
        sort: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show everything about a volume.
    Describe {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Grow a volume to SIZE, or by +SIZE. Attached read-write: an RBD
    /// volume is grown now by its export daemon (the guest sees it at once
    /// only where daemon and VMM pass on vhost-user config changes, else
    /// after a restart); for a host file, Cloud Hypervisor's request is
    /// printed.
    Resize {
        name: String,
        size: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Full independent copy, in the same or another pool.
    Clone {
        name: String,
        new_name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[arg(long)]
        to_pool: Option<String>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Drop unused and zero clusters of a detached qcow2 volume.
    Compress {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        /// Compress the clusters kept.
        #[arg(short = 'c')]
        compress: bool,
        /// Compression type with -c.
        #[arg(long, value_enum, default_value = "zstd")]
        compression_type: CompressionArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete a volume (irreversible).
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
}

fn sort_key(s: &str) -> AnyResult<SortKey> {
    Ok(match s {
        "name" => SortKey::Name,
        "created" => SortKey::Created,
        "size" => SortKey::Size,
        "pool" => SortKey::Pool,
        _ => return Err(format!("--sort {s:?}: use name, created, size or pool").into()),
    })
}

/// `path` of a describe, as text.
pub fn target_text(t: &AttachTarget) -> String {
    match t {
        AttachTarget::File { path, format } => format!("{} ({})", path.display(), format.as_str()),
        other => format!("{other:?}"),
    }
}

pub fn run(args: VolumeArgs) -> AnyResult<()> {
    let vols = args.common.volumes()?;
    match args.cmd {
        VolumeCmd::Create {
            name,
            pool,
            size,
            format,
            prealloc,
            ext4,
            from_archive,
            from_template,
            from_snapshot,
            full,
            out,
        } => {
            let mode = if full {
                LinkMode::Full
            } else {
                LinkMode::Linked
            };
            let source = match (from_archive, from_template, from_snapshot) {
                (Some(path), _, _) => VolumeSource::Archive { path },
                (_, Some(t), _) => VolumeSource::Template { name: t, mode },
                (_, _, Some(s)) => VolumeSource::Snapshot { name: s, mode },
                _ => VolumeSource::Blank {
                    format,
                    prealloc: Prealloc::from(prealloc),
                    ext4,
                },
            };
            let (ctl, _bar) = progress_control(&format!("create {name}"))?;
            let v = vols.create_volume(&pool, &CreateVolume { name, size, source }, &ctl)?;
            report(out.output, &v, |v| {
                println!(
                    "Volume {} created in pool {} ({}, {}, uuid {})",
                    v.record.name,
                    v.pool,
                    v.record.format.as_str(),
                    human(v.record.size),
                    v.id
                );
            })?;
        }
        VolumeCmd::List {
            pool,
            attached,
            available,
            format,
            name,
            sort,
            out,
        } => {
            let filter = ListFilter {
                pool,
                attached: if attached {
                    Some(true)
                } else if available {
                    Some(false)
                } else {
                    None
                },
                format,
                name,
                sort: sort_key(&sort)?,
            };
            let rows = vols.list_volumes(&filter)?;
            report(out.output, &rows, |rows| {
                println!(
                    "{:<24}{:<12}{:<8}{:>12}{:>12}  Attached",
                    "Name", "Pool", "Format", "Capacity", "Allocation"
                );
                for r in rows {
                    match r {
                        VolumeRow::Ok {
                            pool,
                            name,
                            format,
                            capacity,
                            allocation,
                            attached_to,
                            ..
                        } => println!(
                            "{name:<24}{pool:<12}{:<8}{:>12}{:>12}  {}",
                            format.as_str(),
                            human(*capacity),
                            human(*allocation),
                            if attached_to.is_empty() {
                                "-".to_string()
                            } else {
                                attached_to.join(",")
                            }
                        ),
                        VolumeRow::Damaged { pool, uuid, reason } => {
                            println!("{uuid:<24}{pool:<12}damaged: {reason}")
                        }
                    }
                }
            })?;
        }
        VolumeCmd::Describe { name, pool, out } => {
            let d = vols.describe_volume(&pool, &name)?;
            report(out.output, &d, |d| {
                println!("Name:        {}", d.name);
                println!("UUID:        {}", d.uuid);
                println!("Pool:        {}", d.pool);
                println!("Path:        {}", target_text(&d.path));
                println!("Format:      {}", d.format.as_str());
                println!("Capacity:    {}", human(d.capacity));
                println!("Allocation:  {}", human(d.allocation));
                let chain: Vec<String> = d
                    .backing
                    .iter()
                    .map(|b| format!("{} {} ({})", b.kind, b.name, b.format.as_str()))
                    .collect();
                println!(
                    "Backing:     {}",
                    if chain.is_empty() {
                        "-".into()
                    } else {
                        chain.join(" -> ")
                    }
                );
                for a in &d.attachments {
                    println!(
                        "Attached:    {} at {} ({:?})",
                        a.instance, a.mount_path, a.mode
                    );
                }
                println!("Provenance:  {:?}", d.provenance);
                println!("Created:     {}", d.created);
                if let Some(f) = &d.filesystem {
                    println!(
                        "Filesystem:  ext4, {} used, {} free",
                        human(f.used),
                        human(f.free)
                    );
                }
            })?;
        }
        VolumeCmd::Resize {
            name,
            size,
            pool,
            out,
        } => {
            let new = match size.strip_prefix('+') {
                Some(d) => NewSize::Grow(parse_size(d)?),
                None => NewSize::To(parse_size(&size)?),
            };
            // An RBD volume attached read-write is grown by its export
            // daemon here; a host file attached read-write needs its VMM.
            match vmvol::instance::resize_volume(&vols, &pool, &name, new)? {
                VolumeResized::Done {
                    old_size,
                    new_size,
                    online,
                    note,
                } => {
                    let v = serde_json::json!({"name": name, "old_size": old_size, "new_size": new_size, "online": online, "note": note});
                    report(out.output, &v, |_| {
                        println!(
                            "Volume {name} resized from {} to {}; {note}",
                            human(old_size),
                            human(new_size)
                        );
                    })?;
                }
                VolumeResized::Vmm(on) => {
                    // The CLI cannot reach the VMM: print the request and
                    // leave the size unrecorded until the caller confirms.
                    let v = serde_json::json!({"name": name, "online": true, "request": on.request, "note": on.note});
                    report(out.output, &v, |_| {
                        println!(
                            "Volume {name} is attached read-write: send PUT /vm.resize-disk {} to the VMM; {}",
                            serde_json::to_string(&on.request).unwrap_or_default(),
                            on.note
                        );
                    })?;
                }
            }
        }
        VolumeCmd::Clone {
            name,
            new_name,
            pool,
            to_pool,
            out,
        } => {
            let (ctl, _bar) = progress_control(&format!("clone {name}"))?;
            let v = vols.clone_volume(&pool, &name, &new_name, to_pool.as_deref(), &ctl)?;
            report(out.output, &v, |v| {
                println!(
                    "Volume {name} cloned to {} in pool {} (uuid {})",
                    v.record.name, v.pool, v.id
                );
            })?;
        }
        VolumeCmd::Compress {
            name,
            pool,
            compress,
            compression_type,
            out,
        } => {
            let (ctl, _bar) = progress_control(&format!("compress {name}"))?;
            let c = compress.then(|| compression_type.into());
            let r = vols.compress_volume(&pool, &name, c, &ctl)?;
            report(out.output, &r, |r| {
                println!(
                    "Volume {name} compacted: {} -> {}",
                    human(r.bytes_before),
                    human(r.bytes_after)
                );
            })?;
        }
        VolumeCmd::Delete { name, pool } => {
            vols.delete_volume(&pool, &name)?;
            println!("Volume {name} deleted from pool {pool}");
        }
    }
    Ok(())
}
