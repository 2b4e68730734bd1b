//! Templates: frozen copies of volumes or vetted imported images.

use std::path::Path;

use vmvol_format::{BackingPolicy, Control, Image, OpenOptions, Prealloc};
use vmvol_pool::{EntryKind, ImageSpec, Listed, DATA_IMAGE};

use crate::create::{commit_new, reserve_split};
use crate::error::{Error, Result};
use crate::record::{
    now_rfc3339, validate_name, AttachMode, TemplateRecord, TemplateSource, VolumeRecord,
};
use crate::volumes::{
    chain_host_bytes, copy_data, data_ref, dependents, find, obj, require_free, sort_rows, Found,
    Row, Rows, Volumes,
};

impl Volumes {
    /// A template holding a frozen copy of volume `volume` (refused while
    /// it is attached read-write: the copy would not be consistent).
    pub fn create_template_from_volume(
        &self,
        pool: &str,
        name: &str,
        volume: &str,
        ctl: &Control,
    ) -> Result<Found<TemplateRecord>> {
        const OP: &str = "create template";
        validate_name("template", OP, name)?;
        let object = obj(pool, EntryKind::Template, name);
        let p = self.pool(pool)?;
        let (v, _res, staging) = p
            .transaction(OP, |t| {
                Ok((|| {
                    require_free::<TemplateRecord>(t, pool, name, OP)?;
                    let v = find::<VolumeRecord>(t, pool, volume, OP)?;
                    let rw: Vec<String> = v
                        .record
                        .attachments
                        .iter()
                        .filter(|a| a.mode == AttachMode::Rw)
                        .map(|a| a.instance.clone())
                        .collect();
                    if !rw.is_empty() {
                        return Err(Error::Attached {
                            object: obj(pool, EntryKind::Volume, volume),
                            op: "copy volume into a template (attached read-write)",
                            instances: rw,
                        });
                    }
                    let size = v.record.size;
                    let phys = chain_host_bytes(t, EntryKind::Volume, &v.id);
                    let r = reserve_split(t, &object, OP, size, phys)?;
                    let s = t.stage().map_err(Error::pool(&object, OP))?;
                    Ok((v, r, s))
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let src = data_ref(EntryKind::Volume, &v.id, v.record.format);
        let img = staging
            .copy_full(DATA_IMAGE, &src, v.record.format, ctl)
            .map_err(Error::pool(&object, OP))?;
        let rec = TemplateRecord {
            name: name.to_string(),
            created: now_rfc3339(),
            // What the pool made (RBD: raw whatever was asked).
            format: img.format,
            size: v.record.size,
            ext4: v.record.ext4,
            source: TemplateSource::Volume {
                id: v.id,
                name: v.record.name,
            },
        };
        commit_new(self, pool, staging, &rec, OP)
    }

    /// Imports an image file (raw or qcow2) as a template. The file is
    /// vetted first: format probed, backing files only beside it, with a
    /// recorded format and no loop; its chain is flattened into the copy.
    pub fn import_template(
        &self,
        pool: &str,
        name: &str,
        file: &Path,
        ctl: &Control,
    ) -> Result<Found<TemplateRecord>> {
        const OP: &str = "import template";
        validate_name("template", OP, name)?;
        let object = obj(pool, EntryKind::Template, name);
        let p = self.pool(pool)?;
        let img = Image::open(
            file,
            &OpenOptions::new()
                .read_only(true)
                .policy(BackingPolicy::image_dir(file)),
        )
        .map_err(Error::image(
            format!("{object} (file {})", file.display()),
            "vet image",
        ))?;
        let format = img.format();
        let size = vmvol_format::BlockIo::size(&img);
        if size == 0 || !size.is_multiple_of(512) {
            return Err(Error::invalid(
                &object,
                OP,
                format!("image size {size} is not a positive multiple of 512"),
            ));
        }
        let allocated = img.allocated_bytes().unwrap_or(size);
        let (_res, staging) = p
            .transaction(OP, |t| {
                Ok((|| {
                    require_free::<TemplateRecord>(t, pool, name, OP)?;
                    let r = reserve_split(t, &object, OP, size, allocated)?;
                    let s = t.stage().map_err(Error::pool(&object, OP))?;
                    Ok((r, s))
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let spec = ImageSpec {
            size,
            format,
            prealloc: Prealloc::Off,
        };
        let dst = staging
            .create_image(DATA_IMAGE, &spec, ctl)
            .map_err(Error::pool(&object, OP))?;
        let d = staging
            .open_image(&dst, true)
            .map_err(Error::pool(&object, OP))?;
        copy_data(&img, &*d, ctl, &object, OP)?;
        drop(d);
        let ext4 = staging
            .open_image(&dst, false)
            .ok()
            .is_some_and(|d| vmvol_fs::free_map(&*d).is_ok());
        let rec = TemplateRecord {
            name: name.to_string(),
            created: now_rfc3339(),
            format: dst.format,
            size,
            ext4,
            source: TemplateSource::Image {
                file: file.display().to_string(),
            },
        };
        commit_new(self, pool, staging, &rec, OP)
    }

    /// Templates of `pool`, by name; damaged ones as `Err((id, reason))`.
    pub fn list_templates(&self, pool: &str) -> Result<Rows<TemplateRecord>> {
        let p = self.pool(pool)?;
        let mut out: Vec<_> = p
            .list::<TemplateRecord>(EntryKind::Template, |_, _| true)
            .map_err(Error::pool(format!("pool {pool}"), "list templates"))?
            .into_iter()
            .map(|l| match l {
                Listed::Ok(e) => Row::Ok(Found {
                    pool: pool.to_string(),
                    id: e.id,
                    record: e.record.data,
                }),
                Listed::Damaged(d) => Row::Damaged {
                    uuid: d.id,
                    reason: d.reason,
                },
            })
            .collect();
        sort_rows(&mut out);
        Ok(out)
    }

    /// Template `name` (or UUID) of `pool`.
    pub fn describe_template(&self, pool: &str, name: &str) -> Result<Found<TemplateRecord>> {
        const OP: &str = "describe template";
        let object = obj(pool, EntryKind::Template, name);
        self.pool(pool)?
            .transaction(OP, |t| Ok(find::<TemplateRecord>(t, pool, name, OP)))
            .map_err(Error::pool(&object, OP))?
    }

    /// Deletes a template; refused while volumes or snapshots are linked
    /// to it (naming them).
    pub fn delete_template(&self, pool: &str, name: &str) -> Result<()> {
        const OP: &str = "delete template";
        let object = obj(pool, EntryKind::Template, name);
        self.pool(pool)?
            .transaction(OP, |t| {
                Ok((|| {
                    let tpl = find::<TemplateRecord>(t, pool, name, OP)?;
                    let deps = dependents(t, pool, EntryKind::Template, &tpl.id, OP)?;
                    if !deps.is_empty() {
                        return Err(Error::HasDependents {
                            object: object.clone(),
                            op: OP,
                            dependents: deps
                                .into_iter()
                                .map(|(k, _, n)| format!("{k} {n}"))
                                .collect(),
                        });
                    }
                    t.remove(EntryKind::Template, &tpl.id)
                        .map_err(Error::pool(&object, OP))
                })())
            })
            .map_err(Error::pool(&object, OP))?
    }
}
