//! `vmvol`: a qemu-img / virsh style command line over the whole library.
//!
//! ```sh
//! cargo run --example vmvol -- image create -f qcow2 disk.qcow2 10G
//! cargo run --example vmvol -- image info disk.qcow2 --output json
//! ```
//!
//! Errors are printed as one line on stderr and the exit status is 1.
#![allow(missing_docs)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use vmvol::format::{
    self, BackingMode, BackingPolicy, Compression, Control, ConvertOptions, Format, Image,
    OpenOptions, Prealloc, Qcow2CreateOptions, RawImage, RepairMode,
};

#[path = "vmvol/cli_fs.rs"]
mod cli_fs;
#[path = "vmvol/cli_pool.rs"]
mod cli_pool;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "vmvol",
    version,
    about = "Persistent VM block volumes: images, ext4, pools"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Disk images (like qemu-img).
    #[command(subcommand)]
    Image(ImageCmd),
    /// ext4 filesystems on images.
    #[command(subcommand)]
    Fs(cli_fs::FsCmd),
    /// Storage pools (like virsh pool-*).
    Pool(cli_pool::PoolArgs),
}

/// Output style of commands that report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Human,
    /// JSON on stdout, for scripts.
    Json,
}

#[derive(Args, Clone)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Args, Clone)]
struct ChainArgs {
    /// Image format (probed from the magic when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<Format>,
    /// Directory backing files may live in (repeatable). Default: the image's own directory.
    #[arg(long = "allow-root")]
    allow_root: Vec<PathBuf>,
}

impl ChainArgs {
    fn open_options(&self, image: &Path, read_only: bool) -> OpenOptions {
        let policy = if self.allow_root.is_empty() {
            BackingPolicy::image_dir(image)
        } else {
            BackingPolicy::within(self.allow_root.clone())
        };
        let mut o = OpenOptions::new().read_only(read_only).policy(policy);
        if let Some(f) = self.format {
            o = o.format(f);
        }
        o
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum PreallocArg {
    Off,
    Falloc,
    Full,
}

impl From<PreallocArg> for Prealloc {
    fn from(p: PreallocArg) -> Self {
        match p {
            PreallocArg::Off => Prealloc::Off,
            PreallocArg::Falloc => Prealloc::Falloc,
            PreallocArg::Full => Prealloc::Full,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    Zlib,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Zlib => Compression::Zlib,
        }
    }
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Create an image.
    Create {
        /// Format of the new image.
        #[arg(short = 'f', long = "format", default_value = "qcow2")]
        format: Format,
        /// Backing file (qcow2 only), recorded as given, relative to the new image.
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the backing file (required with -b: formats are never probed).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<Format>,
        /// qcow2 cluster size (512 to 2M).
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Raw preallocation.
        #[arg(long, value_enum, default_value = "off")]
        preallocation: PreallocArg,
        /// Format the new image with ext4.
        #[arg(long)]
        ext4: bool,
        /// ext4 label (with --ext4).
        #[arg(long, requires = "ext4")]
        label: Option<String>,
        file: PathBuf,
        /// Virtual size, e.g. 10G (defaults to the backing file's size with -b).
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show an image's format, sizes and backing chain.
    Info {
        file: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show which ranges of an image hold data, zeros or nothing.
    Map {
        file: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "0")]
        start_offset: u64,
        #[arg(long, value_parser = parse_size)]
        max_length: Option<u64>,
        #[command(flatten)]
        chain: ChainArgs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Check a qcow2 image's metadata (and repair leaks with -r leaks).
    Check {
        file: PathBuf,
        /// Repair: `leaks` frees leaked clusters.
        #[arg(short = 'r', long = "repair")]
        repair: Option<RepairArg>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Grow an image (`SIZE` or `+SIZE`); shrinking is refused.
    Resize {
        file: PathBuf,
        /// New size, or +DELTA.
        size: String,
        /// Raw preallocation for the new part.
        #[arg(long, value_enum, default_value = "off")]
        preallocation: PreallocArg,
        #[command(flatten)]
        chain: ChainArgs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Copy an image to a new file, converting its format.
    Convert {
        #[command(flatten)]
        chain: ChainArgs,
        /// Output format.
        #[arg(short = 'O', long = "output-format", default_value = "qcow2")]
        output_format: Format,
        /// Compress the output clusters (qcow2).
        #[arg(short = 'c', long)]
        compress: bool,
        /// Compression type with -c.
        #[arg(long, value_enum, default_value = "zstd")]
        compression_type: CompressionArg,
        /// Keep the backing chain (copy only the top image's clusters) instead of flattening.
        #[arg(long)]
        keep_backing: bool,
        /// Output cluster size (qcow2).
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        src: PathBuf,
        dst: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Rewrite a qcow2 image with only its used clusters, optionally compressed.
    Compact {
        file: PathBuf,
        /// Compress the clusters.
        #[arg(short = 'c', long)]
        compress: bool,
        /// Compression type with -c.
        #[arg(long, value_enum, default_value = "zstd")]
        compression_type: CompressionArg,
        /// Do not consult the ext4 free-space map (keep every allocated cluster).
        #[arg(long)]
        no_fs_free: bool,
        #[command(flatten)]
        chain: ChainArgs,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RepairArg {
    Leaks,
}

/// Parse `10G`, `512M`, `1.5T`, `4096`, `64K`, `2MiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let idx = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(idx);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches("ib").trim_end_matches('b');
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(format!("{s:?}: unknown size unit (use K, M, G, T, P)")),
    };
    if num.is_empty() {
        return Err(format!("{s:?}: not a size"));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("{s:?}: size too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?}: size out of range"));
    }
    Ok(v.round() as u64)
}

/// `1.5 GiB`-style rendering.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Print `value` as JSON, or run `human` to print it for people.
pub fn report<T: Serialize>(out: Output, value: &T, human: impl FnOnce(&T)) -> AnyResult<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Human => human(value),
    }
    Ok(())
}

/// A [`Control`] that draws a progress bar when stdout is a terminal and
/// cancels on Ctrl-C-free paths (the flag is kept for embedders' use).
pub fn progress_control(what: &str) -> (Control, Option<indicatif::ProgressBar>) {
    let cancel = Arc::new(AtomicBool::new(false));
    let ctl = Control::new().with_cancel(cancel.clone());
    if !std::io::stdout().is_terminal() {
        return (ctl, None);
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    let b = bar.clone();
    let ctl = ctl.with_progress(move |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    // Keep the flag reachable so the bar's owner could cancel; nothing sets it here.
    let _ = cancel.load(Ordering::Relaxed);
    (ctl, Some(bar))
}

fn image_cmd(cmd: ImageCmd) -> AnyResult<()> {
    match cmd {
        ImageCmd::Create {
            format: fmt,
            backing,
            backing_format,
            cluster_size,
            preallocation,
            ext4,
            label,
            file,
            size,
            out,
        } => {
            if backing.is_some() && fmt != Format::Qcow2 {
                return Err("a backing file needs -f qcow2".into());
            }
            let size = match (size, &backing) {
                (Some(s), _) => s,
                (None, Some(b)) => {
                    let bf = backing_format
                        .ok_or("-b needs -F FORMAT: backing formats are never probed")?;
                    let base = file.parent().unwrap_or(Path::new(".")).join(b);
                    format::virtual_size(&base, bf)?
                }
                (None, None) => return Err("SIZE is required without a backing file".into()),
            };
            match fmt {
                Format::Raw => {
                    let (ctl, bar) = progress_control("preallocating");
                    RawImage::create(&file, size, preallocation.into(), &ctl)?;
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                }
                Format::Qcow2 => {
                    let mut o = Qcow2CreateOptions::new(size).cluster_size(cluster_size);
                    if let Some(b) = backing {
                        let bf = backing_format
                            .ok_or("-b needs -F FORMAT: backing formats are never probed")?;
                        o = o.backing(b, bf);
                    }
                    format::Qcow2Image::create(&file, &o)?;
                }
            }
            if ext4 {
                let opts = OpenOptions::new()
                    .read_only(false)
                    .policy(BackingPolicy::image_dir(&file));
                let img = Image::open(&file, &opts)?;
                if let Err(e) = cli_fs::mkfs_on(&img, label, out.output) {
                    drop(img);
                    let _ = std::fs::remove_file(&file);
                    return Err(e);
                }
            } else if out.output == Output::Json {
                let info = format::info(
                    &file,
                    &OpenOptions::new().policy(BackingPolicy::image_dir(&file)),
                )?;
                report(out.output, &info, |_| {})?;
            } else {
                println!("Formatting '{}', fmt={fmt} size={size}", file.display());
            }
        }
        ImageCmd::Info { file, chain, out } => {
            let info = format::info(&file, &chain.open_options(&file, true))?;
            report(out.output, &info, |i| {
                println!("image: {}", i.filename);
                println!("file format: {}", i.format);
                println!(
                    "virtual size: {} ({} bytes)",
                    human(i.virtual_size),
                    i.virtual_size
                );
                println!("disk size: {}", human(i.actual_size));
                if let Some(c) = i.cluster_size {
                    println!("cluster_size: {c}");
                }
                if let Some(b) = &i.backing_filename {
                    println!("backing file: {b}");
                }
                if let Some(f) = i.backing_format {
                    println!("backing file format: {f}");
                }
                if let Some(c) = &i.compression_type {
                    println!("compression type: {c}");
                }
                if i.snapshot_count > 0 {
                    println!("internal snapshots: {}", i.snapshot_count);
                }
                if i.dirty || i.corrupt {
                    println!("dirty: {}  corrupt: {}", i.dirty, i.corrupt);
                }
                for (n, c) in i.chain.iter().enumerate() {
                    println!(
                        "  backing[{}]: {} ({}, {})",
                        n + 1,
                        c.filename,
                        c.format,
                        human(c.virtual_size)
                    );
                }
            })?;
        }
        ImageCmd::Map {
            file,
            start_offset,
            max_length,
            chain,
            out,
        } => {
            let img = Image::open(&file, &chain.open_options(&file, true))?;
            let size = format::BlockIo::size(&img);
            let start = start_offset.min(size);
            let len = max_length.unwrap_or(size - start).min(size - start);
            let map = img.map(start, len)?;
            report(out.output, &map, |m| {
                println!(
                    "{:<20}{:<20}{:<8}{:<6}{:<6}",
                    "Offset", "Length", "Depth", "Data", "Zero"
                );
                for e in m {
                    println!(
                        "{:<#20x}{:<#20x}{:<8}{:<6}{:<6}",
                        e.start, e.length, e.depth, e.data, e.zero
                    );
                }
            })?;
        }
        ImageCmd::Check { file, repair, out } => {
            let mode = match repair {
                Some(RepairArg::Leaks) => RepairMode::Leaks,
                None => RepairMode::None,
            };
            let r = format::check(&file, mode)?;
            let bad = r.corruptions > 0 || r.check_errors > 0 || (r.leaks > r.leaks_fixed);
            report(out.output, &r, |r| {
                for m in &r.messages {
                    println!("{m}");
                }
                if !r.checked {
                    println!("{}: nothing to check for this format", r.filename);
                } else if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
                    println!("No errors were found on the image.");
                } else {
                    println!(
                        "{} leaked clusters, {} corruptions, {} check errors; {} leaks fixed",
                        r.leaks, r.corruptions, r.check_errors, r.leaks_fixed
                    );
                }
            })?;
            if bad {
                return Err(format!("{}: check found problems", file.display()).into());
            }
        }
        ImageCmd::Resize {
            file,
            size,
            preallocation,
            chain,
            out,
        } => {
            let img = Image::open(&file, &chain.open_options(&file, false))?;
            let cur = format::BlockIo::size(&img);
            let new = match size.strip_prefix('+') {
                Some(d) => cur.checked_add(parse_size(d)?).ok_or("size overflows")?,
                None if size.starts_with('-') => {
                    return Err(format!("{}: shrinking is not supported", file.display()).into())
                }
                None => parse_size(&size)?,
            };
            match img.as_raw() {
                Some(raw) => {
                    let (ctl, bar) = progress_control("preallocating");
                    raw.grow_with(new, preallocation.into(), &ctl)?;
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                }
                None => img.grow(new)?,
            }
            format::BlockIo::flush(&img)?;
            #[derive(Serialize)]
            struct Resized {
                filename: PathBuf,
                old_size: u64,
                new_size: u64,
            }
            let r = Resized {
                filename: file.clone(),
                old_size: cur,
                new_size: new,
            };
            report(out.output, &r, |r| {
                println!(
                    "Image resized to {} ({} bytes).",
                    human(r.new_size),
                    r.new_size
                );
            })?;
        }
        ImageCmd::Convert {
            chain,
            output_format,
            compress,
            compression_type,
            keep_backing,
            cluster_size,
            src,
            dst,
            out,
        } => {
            let opts = ConvertOptions {
                format: output_format,
                cluster_size,
                compress: compress.then(|| compression_type.into()),
                backing: if keep_backing {
                    BackingMode::Keep
                } else {
                    BackingMode::Flatten
                },
                ..ConvertOptions::default()
            };
            let (ctl, bar) = progress_control("converting");
            let r = format::convert(&src, &chain.open_options(&src, true), &dst, &opts, &ctl)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            report(out.output, &r, |r| {
                println!(
                    "{} -> {} ({}, {} allocated)",
                    src.display(),
                    r.output.display(),
                    r.format,
                    human(r.bytes_allocated)
                );
            })?;
        }
        ImageCmd::Compact {
            file,
            compress,
            compression_type,
            no_fs_free,
            chain,
            out,
        } => {
            let unused = if no_fs_free {
                Vec::new()
            } else {
                cli_fs::unused_ranges(&file, &chain.open_options(&file, true))
            };
            let opts = format::CompactOptions {
                compression: compress.then(|| compression_type.into()),
                unused_ranges: unused
                    .into_iter()
                    .map(|(o, l)| format::ByteRange::new(o, l))
                    .collect(),
                ..format::CompactOptions::default()
            };
            let (ctl, bar) = progress_control("compacting");
            let r = format::compact(&file, &opts, &ctl)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            report(out.output, &r, |r| {
                println!(
                    "{}: {} -> {}",
                    file.display(),
                    human(r.bytes_before),
                    human(r.bytes_after)
                );
            })?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Image(c) => image_cmd(c),
        Cmd::Fs(c) => cli_fs::run(c),
        Cmd::Pool(c) => cli_pool::run(c),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmvol: {e}");
            ExitCode::FAILURE
        }
    }
}
