//! `memgen data`: resolve a dataset source (fetching a hub dataset into the cache) and describe it,
//! so data can be fetched while online and used offline later.

use std::path::PathBuf;

use clap::Args;

use crate::tasks::{data, hub};

#[derive(Args, Debug)]
pub struct DataArgs {
    /// A local file, a directory of shards, or a hub dataset `hf://OWNER/NAME[/CONFIG[/SPLIT]]`.
    pub source: PathBuf,
    /// The split of a hub source that names none (train, validation, test, …).
    #[arg(long, default_value = "train")]
    pub split: String,
}

/// Print `{"source", "rows", "columns", "files"}` as one JSON line.
pub fn run(args: &DataArgs) -> anyhow::Result<()> {
    let shown = args.source.display().to_string();
    let (source, files) = match args.source.to_str().filter(|s| hub::HubSource::is_hub(s)) {
        Some(s) => {
            let src = hub::HubSource::parse(s, &args.split)?;
            let files = hub::fetch(&src)?;
            (src.name(), files)
        }
        None => (shown, vec![args.source.clone()]),
    };
    let mut rows = Vec::new();
    for f in &files {
        rows.extend(data::read_source(f, &args.split)?);
    }
    let mut columns: Vec<&String> = rows
        .first()
        .map(|r| r.value.keys().collect())
        .unwrap_or_default();
    columns.sort();
    let out = serde_json::json!({
        "source": source,
        "rows": rows.len(),
        "columns": columns,
        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
    });
    println!("{out}");
    Ok(())
}
