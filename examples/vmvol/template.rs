//! `vmvol template …`: templates (frozen copies of volumes, imported images).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use vmvol::volume::Row;

use super::output::progress_control;
use super::volume::Common;
use super::{human, report, AnyResult, OutputArg};

#[derive(Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: TemplateCmd,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Create a template from a volume (frozen copy) or an image file (vetted, flattened).
    Create {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[arg(
            long,
            required_unless_present = "from_image",
            conflicts_with = "from_image"
        )]
        from_volume: Option<String>,
        #[arg(long)]
        from_image: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List a pool's templates.
    List {
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show a template.
    Describe {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete a template (refused while volumes are linked to it).
    Delete {
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
    },
}

pub fn run(args: TemplateArgs) -> AnyResult<()> {
    let vols = args.common.volumes()?;
    match args.cmd {
        TemplateCmd::Create {
            name,
            pool,
            from_volume,
            from_image,
            out,
        } => {
            let (ctl, _bar) = progress_control(&format!("template {name}"))?;
            let t = match (from_volume, from_image) {
                (Some(v), _) => vols.create_template_from_volume(&pool, &name, &v, &ctl)?,
                (None, Some(f)) => vols.import_template(&pool, &name, &f, &ctl)?,
                (None, None) => return Err("give --from-volume or --from-image".into()),
            };
            report(out.output, &t, |t| {
                println!(
                    "Template {} created in pool {} (uuid {})",
                    t.record.name, t.pool, t.id
                );
            })?;
        }
        TemplateCmd::List { pool, out } => {
            let rows = vols.list_templates(&pool)?;
            report(out.output, &rows, |rows| {
                println!("{:<24}{:<8}{:>12}  Created", "Name", "Format", "Size");
                for r in rows {
                    match r {
                        Row::Ok(t) => println!(
                            "{:<24}{:<8}{:>12}  {}",
                            t.record.name,
                            t.record.format.as_str(),
                            human(t.record.size),
                            t.record.created
                        ),
                        Row::Damaged { uuid, reason } => println!("{uuid:<24}damaged: {reason}"),
                    }
                }
            })?;
        }
        TemplateCmd::Describe { name, pool, out } => {
            let t = vols.describe_template(&pool, &name)?;
            report(out.output, &t, |t| {
                println!("Name:     {}", t.record.name);
                println!("UUID:     {}", t.id);
                println!("Pool:     {}", t.pool);
                println!("Format:   {}", t.record.format.as_str());
                println!("Size:     {}", human(t.record.size));
                println!("Source:   {:?}", t.record.source);
                println!("Created:  {}", t.record.created);
            })?;
        }
        TemplateCmd::Delete { name, pool } => {
            vols.delete_template(&pool, &name)?;
            println!("Template {name} deleted from pool {pool}");
        }
    }
    Ok(())
}
