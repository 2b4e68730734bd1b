//! `vmvol instance …`: an instance gets all its volumes when it is created
//! (with its config disk), shows its Cloud Hypervisor disks, and detaches.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Map, Value};

use vmvol::chv::export::{ExportState, ExportStatus};
use vmvol::chv::ImageType;
use vmvol::format::{detect_format, Format};
use vmvol::instance::{Vm, VmDisks};
use vmvol::volume::{AttachVolume, InstanceRow, OverlayKind};

use super::volume::Common;
use super::{parse_size, report, AnyResult, OutputArg};

#[derive(Args)]
pub struct InstanceArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: InstanceCmd,
}

#[derive(Subcommand)]
enum InstanceCmd {
    /// Attach every volume of a new instance (all or nothing) and write its config disk.
    Attach {
        /// The instance id (chosen by the caller).
        id: String,
        /// Rootfs image (/dev/vda, read-only); its format is detected.
        #[arg(long)]
        rootfs: PathBuf,
        /// The instance's writable overlay (/dev/vdb); its format is detected.
        #[arg(long)]
        instance_overlay: PathBuf,
        /// A volume: [POOL/]NAME:PATH[:ro][:overlay=SIZE[,block]] (repeatable, in device order).
        #[arg(long = "volume", value_name = "SPEC", conflicts_with = "request")]
        volumes: Vec<String>,
        /// The volumes as the seed's JSON array of {"volume_id", "mount_path",
        /// "readonly", "overlay", "overlay_size"} (plus "pool", "overlay_kind").
        #[arg(long, value_name = "FILE.json")]
        request: Option<PathBuf>,
        /// A JSON object of extra top-level fields for /config.json.
        #[arg(long, value_name = "FILE.json")]
        config_extra: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// The instance's disks: Cloud Hypervisor's DiskConfig array, or --disk arguments.
    Disks {
        id: String,
        #[arg(long, value_enum, default_value = "json")]
        output: DisksOutput,
    },
    /// List the instances of this host.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show an instance: its volumes, disks in /dev/vdX order and mount plan.
    Show {
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Detach every volume of an instance (exports stopped; volumes are kept; overlays and the config disk go).
    Detach { id: String },
    /// The instance's vhost-user exports (RBD volumes) and whether their daemons run.
    Exports {
        id: String,
        /// Start again the exports whose daemon is not running (e.g. after a reboot).
        #[arg(long)]
        restart: bool,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DisksOutput {
    /// The DiskConfig array, exactly Cloud Hypervisor's JSON.
    Json,
    /// One `--disk` argument per line, for the cloud-hypervisor command line.
    ChvArgs,
}

/// Parses `[POOL/]NAME:PATH[:ro][:overlay=SIZE[,block]]`.
fn parse_volume(spec: &str) -> Result<AttachVolume, String> {
    let bad = |why: &str| {
        format!("--volume {spec:?}: {why} (expected [POOL/]NAME:PATH[:ro][:overlay=SIZE[,block]])")
    };
    let mut parts = spec.split(':');
    let vol = parts.next().unwrap_or_default();
    let (pool, volume_id) = match vol.split_once('/') {
        Some((p, v)) => (Some(p.to_string()), v.to_string()),
        None => (None, vol.to_string()),
    };
    let mount_path = parts
        .next()
        .ok_or_else(|| bad("no mount path"))?
        .to_string();
    let mut v = AttachVolume {
        pool,
        volume_id,
        mount_path,
        readonly: false,
        overlay: false,
        overlay_size: None,
        overlay_kind: OverlayKind::GuestOverlayfs,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => v.readonly = true,
            None if opt == "rw" => v.readonly = false,
            Some(("overlay", rest)) => {
                let (size, kind) = match rest.split_once(',') {
                    Some((s, "block")) => (s, OverlayKind::Block),
                    Some((s, "overlayfs")) => (s, OverlayKind::GuestOverlayfs),
                    Some((_, k)) => return Err(bad(&format!("unknown overlay kind {k:?}"))),
                    None => (rest, OverlayKind::GuestOverlayfs),
                };
                v.overlay = true;
                v.overlay_size = Some(parse_size(size).map_err(|e| bad(&e))?);
                v.overlay_kind = kind;
            }
            _ => return Err(bad(&format!("unknown option {opt:?}"))),
        }
    }
    Ok(v)
}

fn image_type(path: &Path) -> AnyResult<ImageType> {
    Ok(match detect_format(path)? {
        Format::Raw => ImageType::Raw,
        Format::Qcow2 => ImageType::Qcow2,
    })
}

fn print_exports(exports: &[ExportStatus]) {
    for e in exports {
        let mode = if e.writable { "rw" } else { "ro" };
        let state = match &e.state {
            ExportState::Running { pid } => format!("running (pid {pid})"),
            ExportState::Stopped => "stopped".to_string(),
            ExportState::Dead { reason } => format!("DEAD: {reason}"),
        };
        println!(
            "export {} {mode} on {}: {state}",
            e.what,
            e.socket.display()
        );
    }
}

fn print_vm(vm: &Vm) {
    let i = &vm.instance.instance;
    println!("Instance {} ({})", i.id, i.state.as_str());
    println!("{:<10}{:<18}{:<8}Path", "Device", "Role", "Mode");
    for d in &vm.plan.disks {
        let role = serde_json::to_value(&d.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let role = match &d.volume {
            Some(v) => format!("{role} {v}"),
            None => role,
        };
        let mode = if d.config.readonly { "ro" } else { "rw" };
        let path = match (&d.config.path, &d.config.vhost_socket) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(s)) => format!("vhost-user {s}"),
            (None, None) => String::new(),
        };
        println!("{:<10}{role:<18}{mode:<8}{path}", d.device);
    }
    for m in &vm.plan.volume_mounts {
        match &m.overlay_device {
            Some(o) => println!(
                "mount {} at {} ({}, upper on {o})",
                m.device, m.path, m.mode
            ),
            None => println!("mount {} at {} ({})", m.device, m.path, m.mode),
        }
    }
    print_exports(&vm.exports);
    if vm.plan.requires_shared_memory {
        println!("vhost-user disks: the VMM needs shared memory (cloud-hypervisor --memory ...,shared=on)");
    }
}

pub fn run(args: InstanceArgs) -> AnyResult<()> {
    let vols = args.common.volumes()?;
    match args.cmd {
        InstanceCmd::Attach {
            id,
            rootfs,
            instance_overlay,
            volumes,
            request,
            config_extra,
            out,
        } => {
            let volumes: Vec<AttachVolume> = match request {
                Some(f) => {
                    let bytes =
                        std::fs::read(&f).map_err(|e| format!("--request {}: {e}", f.display()))?;
                    serde_json::from_slice(&bytes)
                        .map_err(|e| format!("--request {}: {e}", f.display()))?
                }
                None => volumes
                    .iter()
                    .map(|s| parse_volume(s))
                    .collect::<Result<_, _>>()?,
            };
            let config_extra: Map<String, Value> = match config_extra {
                Some(f) => {
                    let bytes = std::fs::read(&f)
                        .map_err(|e| format!("--config-extra {}: {e}", f.display()))?;
                    serde_json::from_slice(&bytes).map_err(|e| {
                        format!("--config-extra {}: a JSON object: {e}", f.display())
                    })?
                }
                None => Map::new(),
            };
            let disks = VmDisks {
                rootfs_image_type: image_type(&rootfs)?,
                rootfs,
                instance_overlay_image_type: image_type(&instance_overlay)?,
                instance_overlay,
                config_extra,
            };
            let vm = vmvol::instance::attach(&vols, &id, volumes, &disks)?;
            report(out.output, &vm, print_vm)?;
        }
        InstanceCmd::Disks { id, output } => {
            let vm = vmvol::instance::show(&vols, &id)?;
            match output {
                DisksOutput::Json => println!("{}", vm.plan.disks_json()?),
                DisksOutput::ChvArgs => {
                    for a in vm.plan.disk_args()? {
                        println!("{a}");
                    }
                    // Not an argument of ours to print: the memory size is
                    // the caller's, and shared=on belongs in that one --memory.
                    if vm.plan.requires_shared_memory {
                        eprintln!(
                            "note: vhost-user disks: cloud-hypervisor needs --memory size=...,shared=on"
                        );
                    }
                }
            }
        }
        InstanceCmd::List { out } => {
            let rows = vols.list_instances()?;
            report(out.output, &rows, |rows| {
                println!("{:<32}{:<12}{:>8}  Created", "Instance", "State", "Volumes");
                for r in rows {
                    match r {
                        InstanceRow::Ok(i) => println!(
                            "{:<32}{:<12}{:>8}  {}",
                            i.id,
                            i.state.as_str(),
                            i.volumes.len(),
                            i.created
                        ),
                        InstanceRow::Damaged { id, reason } => {
                            println!("{id:<32}{:<12}{:>8}  {reason}", "damaged", "-")
                        }
                    }
                }
            })?;
        }
        InstanceCmd::Show { id, out } => {
            let vm = vmvol::instance::show(&vols, &id)?;
            report(out.output, &vm, print_vm)?;
        }
        InstanceCmd::Exports { id, restart, out } => {
            let exports = if restart {
                vmvol::instance::restart_exports(&vols, &id)?
            } else {
                vmvol::instance::show(&vols, &id)?.exports
            };
            report(out.output, &exports, |e| print_exports(e))?;
        }
        InstanceCmd::Detach { id } => {
            let d = vmvol::instance::detach(&vols, &id)?;
            if d.volumes.is_empty() {
                println!("Instance {id}: nothing attached");
            } else {
                println!("Instance {id} detached from {} volume(s)", d.volumes.len());
            }
        }
    }
    Ok(())
}
