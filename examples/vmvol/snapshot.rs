//! `vmvol snapshot …`: snapshots of detached volumes.

use clap::{Args, Subcommand};

use vmvol::volume::Row;

use super::output::progress_control;
use super::volume::Common;
use super::{human, report, AnyResult, OutputArg};

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: SnapshotCmd,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshot a detached volume (qcow2: O(1) external snapshot; raw: full copy).
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List snapshots (of one volume with --volume).
    List {
        #[arg(long, default_value = "default")]
        pool: String,
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show a snapshot.
    Describe {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete a snapshot; --merge pulls its data into its dependents first.
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[arg(long)]
        merge: bool,
    },
}

pub fn run(args: SnapshotArgs) -> AnyResult<()> {
    let vols = args.common.volumes()?;
    match args.cmd {
        SnapshotCmd::Create {
            name,
            pool,
            volume,
            out,
        } => {
            let (ctl, _bar) = progress_control(&format!("snapshot {name}"))?;
            let s = vols.create_snapshot(&pool, &name, &volume, &ctl)?;
            report(out.output, &s, |s| {
                println!(
                    "Snapshot {} of volume {} created (uuid {})",
                    s.record.name, s.record.volume_name, s.id
                );
            })?;
        }
        SnapshotCmd::List { pool, volume, out } => {
            let rows = vols.list_snapshots(&pool, volume.as_deref())?;
            report(out.output, &rows, |rows| {
                println!(
                    "{:<24}{:<24}{:<8}{:>12}  Created",
                    "Name", "Volume", "Format", "Size"
                );
                for r in rows {
                    match r {
                        Row::Ok(s) => println!(
                            "{:<24}{:<24}{:<8}{:>12}  {}",
                            s.record.name,
                            s.record.volume_name,
                            s.record.format.as_str(),
                            human(s.record.size),
                            s.record.created
                        ),
                        Row::Damaged { uuid, reason } => println!("{uuid:<24}damaged: {reason}"),
                    }
                }
            })?;
        }
        SnapshotCmd::Describe { name, pool, out } => {
            let s = vols.describe_snapshot(&pool, &name)?;
            report(out.output, &s, |s| {
                println!("Name:     {}", s.record.name);
                println!("UUID:     {}", s.id);
                println!("Pool:     {}", s.pool);
                println!("Volume:   {} ({})", s.record.volume_name, s.record.volume);
                println!("Format:   {}", s.record.format.as_str());
                println!("Size:     {}", human(s.record.size));
                if let Some(b) = &s.record.base {
                    println!("Base:     {} {}", b.kind, b.name);
                }
                println!("Created:  {}", s.record.created);
            })?;
        }
        SnapshotCmd::Delete { name, pool, merge } => {
            vols.delete_snapshot(&pool, &name, merge)?;
            println!("Snapshot {name} deleted from pool {pool}");
        }
    }
    Ok(())
}
