//! Quickstart: a 1 GiB qcow2 image on a raw template; write, read, print its info.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
#![allow(missing_docs)]

use vmvol::format::{
    self, BackingPolicy, BlockIo, Control, Format, Image, OpenOptions, Prealloc,
    Qcow2CreateOptions, Qcow2Image, RawImage,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("template.raw");
    let disk = dir.path().join("disk.qcow2");

    // A sparse 1 GiB raw template with a recognisable first sector.
    let t = RawImage::create(&template, 1 << 30, Prealloc::Off, &Control::new())?;
    t.write_at(b"template data", 0)?;
    t.flush()?;
    drop(t);

    // A qcow2 image whose backing file is the template (recorded with its format:
    // vmvol never probes backing formats).
    Qcow2Image::create(
        &disk,
        &Qcow2CreateOptions::new(1 << 30).backing("template.raw", Format::Raw),
    )?;

    // Backing files must resolve inside the directories the caller allows.
    let opts = OpenOptions::new()
        .read_only(false)
        .policy(BackingPolicy::within([dir.path()]));
    let img = Image::open(&disk, &opts)?;
    img.write_at(b"written through the overlay", 512 << 20)?;
    img.flush()?;

    let mut head = [0u8; 13];
    img.read_at(&mut head, 0)?;
    let mut mid = [0u8; 27];
    img.read_at(&mut mid, 512 << 20)?;
    println!(
        "read from the template: {:?}",
        String::from_utf8_lossy(&head)
    );
    println!(
        "read from the overlay:  {:?}",
        String::from_utf8_lossy(&mid)
    );
    drop(img);

    let info = format::info(&disk, &opts)?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}
