//! Feature bits of `s_feature_compat`, `s_feature_incompat` and
//! `s_feature_ro_compat`, and the sets vmvol writes and accepts.

pub(crate) const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub(crate) const COMPAT_EXT_ATTR: u32 = 0x8;
pub(crate) const COMPAT_RESIZE_INODE: u32 = 0x10;
pub(crate) const COMPAT_DIR_INDEX: u32 = 0x20;
pub(crate) const COMPAT_SPARSE_SUPER2: u32 = 0x200;

pub(crate) const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub(crate) const RO_COMPAT_LARGE_FILE: u32 = 0x2;
pub(crate) const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub(crate) const RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub(crate) const RO_COMPAT_DIR_NLINK: u32 = 0x20;
pub(crate) const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
pub(crate) const RO_COMPAT_BIGALLOC: u32 = 0x200;
pub(crate) const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// Read-only-compatible features we know. Unknown ones are refused by the
/// reader: `bigalloc` shows that such a feature can change what a bitmap bit
/// means, and a wrong free map makes compaction destroy data.
pub(crate) const RO_COMPAT_KNOWN: u32 = 0x1FFFF;

pub(crate) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(crate) const INCOMPAT_RECOVER: u32 = 0x4;
pub(crate) const INCOMPAT_META_BG: u32 = 0x10;
pub(crate) const INCOMPAT_EXTENTS: u32 = 0x40;
pub(crate) const INCOMPAT_64BIT: u32 = 0x80;
pub(crate) const INCOMPAT_MMP: u32 = 0x100;
pub(crate) const INCOMPAT_FLEX_BG: u32 = 0x200;
pub(crate) const INCOMPAT_CSUM_SEED: u32 = 0x2000;

/// Incompatible features whose on-disk meaning the reader knows and which do
/// not change how blocks are allocated (or whose change it implements).
pub(crate) const INCOMPAT_SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | 0x400 // ea_inode
    | 0x1000 // dirdata
    | INCOMPAT_CSUM_SEED
    | 0x4000 // large_dir
    | 0x8000 // inline_data
    | 0x10000 // encrypt
    | 0x20000; // casefold

/// Names of incompatible feature bits, for error messages.
const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "compression"),
    (INCOMPAT_FILETYPE, "filetype"),
    (INCOMPAT_RECOVER, "needs_recovery"),
    (0x8, "journal_dev"),
    (INCOMPAT_META_BG, "meta_bg"),
    (INCOMPAT_EXTENTS, "extent"),
    (INCOMPAT_64BIT, "64bit"),
    (INCOMPAT_MMP, "mmp"),
    (INCOMPAT_FLEX_BG, "flex_bg"),
    (0x400, "ea_inode"),
    (0x1000, "dirdata"),
    (INCOMPAT_CSUM_SEED, "metadata_csum_seed"),
    (0x4000, "large_dir"),
    (0x8000, "inline_data"),
    (0x10000, "encrypt"),
    (0x20000, "casefold"),
];

/// What vmvol's writer sets: the `mke2fs -t ext4` defaults it implements.
pub(crate) const WRITER_INCOMPAT: u32 =
    INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG;
/// What vmvol's writer sets (see [`WRITER_INCOMPAT`]).
pub(crate) const WRITER_RO_COMPAT: u32 = RO_COMPAT_SPARSE_SUPER
    | RO_COMPAT_LARGE_FILE
    | RO_COMPAT_HUGE_FILE
    | RO_COMPAT_DIR_NLINK
    | RO_COMPAT_EXTRA_ISIZE
    | RO_COMPAT_METADATA_CSUM;
/// What vmvol's writer always sets; `has_journal` and `resize_inode` are
/// added when the filesystem has them.
pub(crate) const WRITER_COMPAT: u32 = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX;

/// Names of the set incompatible bits of `bits`, for messages
/// (`"mmp (0x100), unknown bit 30 (0x40000000)"`).
pub(crate) fn incompat_names(bits: u32) -> String {
    let mut names = Vec::new();
    for shift in 0..32 {
        let bit = 1u32 << shift;
        if bits & bit == 0 {
            continue;
        }
        match INCOMPAT_NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => names.push(format!("{name} (0x{bit:x})")),
            None => names.push(format!("unknown bit {shift} (0x{bit:x})")),
        }
    }
    names.join(", ")
}
