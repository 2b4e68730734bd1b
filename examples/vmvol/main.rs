//! `vmvol`: a qemu-img / virsh style command line over the whole library.
//!
//! ```sh
//! cargo run --example vmvol -- image create -f qcow2 disk.qcow2 10G
//! cargo run --example vmvol -- image info disk.qcow2 --output json
//! ```
//!
//! Errors are printed as one line on stderr and the exit status is 1.
//! Ctrl-C (or SIGTERM) cancels a long operation (convert, compact, populate,
//! preallocation): what it was writing is removed, a one-line message is
//! printed and the exit status is 130 (143 for SIGTERM). A closed stdout
//! (`vmvol … | head -1`) ends the process quietly with status 141.
#![allow(missing_docs)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Every line this binary prints goes through [`output::write_stdout`], which
/// ends the process quietly when stdout's reader has gone; shadowing std's
/// `println!` covers every module declared below without a second spelling.
macro_rules! println {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod fs;
mod image;
mod instance;
mod output;
mod pool;
mod serve;
mod signals;
mod size;
mod snapshot;
mod template;
mod volume;

// pool.rs imports these through `super::`.
use output::{report, OutputArg};
use size::{human, parse_size};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "vmvol",
    version,
    about = "Persistent VM block volumes: images, ext4, pools, volumes, templates, snapshots, instances"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Disk images (like qemu-img).
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// ext4 filesystems on images.
    #[command(subcommand)]
    Fs(fs::FsCmd),
    /// Storage pools (like virsh pool-*).
    Pool(pool::PoolArgs),
    /// Volumes in pools.
    Volume(volume::VolumeArgs),
    /// Templates: frozen images new volumes are made from.
    Template(template::TemplateArgs),
    /// Snapshots of detached volumes.
    Snapshot(snapshot::SnapshotArgs),
    /// Instances: all their volumes attached at creation, Cloud Hypervisor disks, detach.
    Instance(instance::InstanceArgs),
    /// Serve the HTTP API (Unix socket, mode 0600; TCP with --listen and a token).
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Pools on Ceph RBD, when built with `--features rbd`.
    #[cfg(feature = "rbd")]
    vmvol::rbd::register();
    let res = match cli.cmd {
        Cmd::Image(c) => image::run(c),
        Cmd::Fs(c) => fs::run(c),
        Cmd::Pool(c) => pool::run(c),
        Cmd::Volume(c) => volume::run(c),
        Cmd::Template(c) => template::run(c),
        Cmd::Snapshot(c) => snapshot::run(c),
        Cmd::Instance(c) => instance::run(c),
        Cmd::Serve(c) => serve::run(c),
    };
    match (res, signals::received()) {
        (Ok(()), _) => ExitCode::SUCCESS,
        // Interrupted: the library's error says what was cancelled.
        (Err(e), Some(sig)) => {
            eprintln!("vmvol: interrupted: {e}");
            ExitCode::from(u8::try_from(128 + sig).unwrap_or(130))
        }
        (Err(e), None) => {
            eprintln!("vmvol: {e}");
            ExitCode::FAILURE
        }
    }
}
