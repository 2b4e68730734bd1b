//! `vmvol image …`: disk images, like `qemu-img`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use vmvol::format::{
    self, BackingMode, BackingPolicy, Compression, ConvertOptions, Format, Image, OpenOptions,
    Prealloc, Qcow2CreateOptions, RawImage, RepairMode,
};

use crate::output::{progress_control, report, Output, OutputArg};
use crate::size::{human, parse_size};
use crate::AnyResult;

#[derive(Args, Clone)]
pub struct ChainArgs {
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
pub enum PreallocArg {
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
pub enum CompressionArg {
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
pub enum ImageCmd {
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
    /// Check a qcow2 image's metadata (repair leaks with -r leaks, rebuild refcounts with -r all).
    Check {
        file: PathBuf,
        /// Repair: `leaks` frees leaked clusters; `all` rebuilds refcounts.
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
pub enum RepairArg {
    Leaks,
    /// Rebuild refcounts (also repairs refcounts that are too low).
    All,
}

pub fn run(cmd: ImageCmd) -> AnyResult<()> {
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
                    let (ctl, _progress) = progress_control("preallocating")?;
                    RawImage::create(&file, size, preallocation.into(), &ctl)?;
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
                if let Err(e) = crate::fs::mkfs_on(&img, label, out.output) {
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
            if img.as_qcow2().is_some_and(|q| q.was_dirty()) {
                eprintln!(
                    "note: {} is dirty (refcounts not written back); read as is",
                    file.display()
                );
            }
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
                Some(RepairArg::All) => RepairMode::All,
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
                    let (ctl, _progress) = progress_control("preallocating")?;
                    raw.grow_with(new, preallocation.into(), &ctl)?;
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
            let r = {
                let (ctl, _progress) = progress_control("converting")?;
                format::convert(&src, &chain.open_options(&src, true), &dst, &opts, &ctl)?
            };
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
                fs_unused_ranges(&file, &chain.open_options(&file, true))
            };
            let opts = format::CompactOptions {
                compression: compress.then(|| compression_type.into()),
                unused_ranges: unused,
                ..format::CompactOptions::default()
            };
            let r = {
                let (ctl, _progress) = progress_control("compacting")?;
                format::compact(&file, &opts, &ctl)?
            };
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

/// The guest byte ranges the image's ext4 does not use, which compaction may
/// drop; empty (keep every cluster) when the image holds no ext4. An ext4 we
/// cannot trust (checksum mismatch, journal to replay, unknown feature) keeps
/// every cluster too, with a warning: dropping "free" space of such a
/// filesystem could drop live data.
fn fs_unused_ranges(file: &Path, opts: &OpenOptions) -> Vec<format::ByteRange> {
    let Ok(img) = Image::open(file, opts) else {
        return Vec::new();
    };
    match vmvol::fs::unused_ranges(&img) {
        Ok(Some(ranges)) => ranges,
        Ok(None) => Vec::new(),
        Err(e) => {
            eprintln!("vmvol: warning: keeping every cluster: {e}");
            Vec::new()
        }
    }
}
