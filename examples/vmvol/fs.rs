//! `vmvol fs …`: ext4 on images.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use vmvol::format::{
    BackingPolicy, BlockIo, Control, Format, Image, OpenOptions, Prealloc, Qcow2CreateOptions,
    Qcow2Image, RawImage,
};
use vmvol::fs::{self as vfs, Journal, MkfsOptions, PopulateOptions, PopulateReport, Source};

use crate::output::{progress_control, report, Output, OutputArg};
use crate::size::{human, parse_size};
use crate::AnyResult;

#[derive(Subcommand)]
pub enum FsCmd {
    /// Make an ext4 filesystem on an image.
    Mkfs {
        image: PathBuf,
        #[command(flatten)]
        opts: MkfsArgs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Make ext4 holding a directory tree or a tar archive (plain or gzip).
    ///
    /// A missing IMAGE is created (format from -f, size from --size or from the
    /// content with headroom); an existing one is reformatted.
    Populate {
        image: PathBuf,
        /// Directory or tar archive.
        #[arg(long)]
        from: PathBuf,
        /// Format of an image to create.
        #[arg(short = 'f', long = "format", default_value = "raw")]
        format: Format,
        /// Size of an image to create (default: computed from the content).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Largest total of file data accepted from the source.
        #[arg(long, value_parser = parse_size)]
        max_bytes: Option<u64>,
        /// Largest number of entries accepted from the source.
        #[arg(long)]
        max_entries: Option<u64>,
        #[command(flatten)]
        opts: MkfsArgs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show the byte ranges the image's ext4 filesystem does not use.
    Free {
        image: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Args, Clone)]
pub struct MkfsArgs {
    /// Block size: 1024, 2048 or 4096.
    #[arg(short = 'b', long, default_value_t = 4096)]
    block_size: u32,
    /// Volume label.
    #[arg(short = 'L', long)]
    label: Option<String>,
    /// Filesystem UUID (random by default).
    #[arg(short = 'U', long)]
    uuid: Option<String>,
    /// Bytes per inode.
    #[arg(short = 'i', long, default_value_t = 16384)]
    inode_ratio: u32,
    /// Reserved blocks percentage.
    #[arg(short = 'm', long, default_value_t = 5.0)]
    reserved_percent: f64,
    /// No journal.
    #[arg(long)]
    no_journal: bool,
    /// Root directory owner as UID:GID.
    #[arg(long)]
    root_owner: Option<String>,
}

impl MkfsArgs {
    fn options(&self) -> AnyResult<MkfsOptions> {
        let mut o = MkfsOptions {
            block_size: self.block_size,
            inode_ratio: self.inode_ratio,
            reserved_percent: self.reserved_percent,
            label: self.label.clone().unwrap_or_default(),
            ..MkfsOptions::default()
        };
        if let Some(u) = &self.uuid {
            o.uuid = Some(u.parse().map_err(|e| format!("--uuid {u:?}: {e}"))?);
        }
        if self.no_journal {
            o.journal = Journal::None;
        }
        if let Some(owner) = &self.root_owner {
            let (u, g) = owner
                .split_once(':')
                .ok_or_else(|| format!("--root-owner {owner:?}: expected UID:GID"))?;
            o.root_uid = u
                .parse()
                .map_err(|e| format!("--root-owner uid {u:?}: {e}"))?;
            o.root_gid = g
                .parse()
                .map_err(|e| format!("--root-owner gid {g:?}: {e}"))?;
        }
        Ok(o)
    }
}

fn open_rw(image: &Path) -> AnyResult<Image> {
    let opts = OpenOptions::new()
        .read_only(false)
        .policy(BackingPolicy::image_dir(image));
    Ok(Image::open(image, &opts)?)
}

/// Make ext4 with default options (used by `image create --ext4`).
pub fn mkfs_on(img: &Image, label: Option<String>, out: Output) -> AnyResult<()> {
    let opts = MkfsOptions {
        label: label.unwrap_or_default(),
        ..MkfsOptions::default()
    };
    let r = vfs::mkfs(img, &opts)?;
    img.flush()?;
    report(out, &r, |r| {
        println!(
            "Formatting '{}' ext4: {} blocks of {} bytes, {} groups, UUID {}",
            img.path().display(),
            r.blocks_count,
            r.block_size,
            r.groups,
            r.uuid
        );
    })
}

pub fn run(cmd: FsCmd) -> AnyResult<()> {
    match cmd {
        FsCmd::Mkfs { image, opts, out } => {
            let img = open_rw(&image)?;
            let r = vfs::mkfs(&img, &opts.options()?)?;
            img.flush()?;
            report(out.output, &r, |r| {
                println!(
                    "{}: ext4, {} blocks of {} bytes, {} groups, UUID {}",
                    image.display(),
                    r.blocks_count,
                    r.block_size,
                    r.groups,
                    r.uuid
                );
            })?;
        }
        FsCmd::Populate {
            image,
            from,
            format,
            size,
            max_bytes,
            max_entries,
            opts,
            out,
        } => {
            let source = if from.is_dir() {
                Source::Dir(from.clone())
            } else {
                Source::Tar(from.clone())
            };
            let mut popts = PopulateOptions {
                mkfs: opts.options()?,
                ..PopulateOptions::default()
            };
            if let Some(b) = max_bytes {
                popts.limits.max_total_bytes = b;
            }
            if let Some(n) = max_entries {
                popts.limits.max_entries = n;
            }
            // Ctrl-C from here on cancels (and removes an image made below)
            // instead of killing the process between creating and filling it.
            let (ctl, progress) = progress_control("populating")?;
            let created = !image.exists();
            if created {
                let size = match size {
                    Some(s) => s,
                    None => vfs::required_size(&source, &popts)?,
                };
                match format {
                    Format::Raw => {
                        RawImage::create(&image, size, Prealloc::Off, &Control::new())?;
                    }
                    Format::Qcow2 => Qcow2Image::create(&image, &Qcow2CreateOptions::new(size))?,
                }
            }
            let result = (|| -> AnyResult<PopulateReport> {
                let img = open_rw(&image)?;
                let r = vfs::populate(&img, &source, &popts, &ctl)?;
                img.flush()?;
                Ok(r)
            })();
            drop(progress);
            let r = match result {
                Ok(r) => r,
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_file(&image);
                    }
                    return Err(e);
                }
            };
            report(out.output, &r, |r| {
                println!(
                    "{}: ext4 from {}: {} files, {} directories, {} symlinks, {} hard links, {} special, {} of data",
                    image.display(),
                    from.display(),
                    r.files,
                    r.directories,
                    r.symlinks,
                    r.hard_links,
                    r.specials,
                    human(r.data_bytes)
                );
            })?;
        }
        FsCmd::Free { image, out } => {
            let opts = OpenOptions::new()
                .read_only(true)
                .policy(BackingPolicy::image_dir(&image));
            let img = Image::open(&image, &opts)?;
            let m = vfs::free_map(&img)?;
            report(out.output, &m, |m| {
                println!(
                    "{}: {} free of {} in {} ranges (block size {})",
                    image.display(),
                    human(m.free_bytes),
                    human(m.fs_bytes),
                    m.ranges.len(),
                    m.block_size
                );
            })?;
        }
    }
    Ok(())
}
