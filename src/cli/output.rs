//! Human tables by default, JSON for scripts.
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

pub fn time(unix: i64) -> String {
    crate::support::clock::rfc3339(unix)
}

/// Prints rows under headers, columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

pub fn init_report(out: OutputFormat, r: &crate::app::InitReport) {
    match out {
        OutputFormat::Json => json(r),
        OutputFormat::Table => {
            println!("data directory  {}", r.data_dir.display());
            println!("database        {}", r.database);
            println!("signer          {}", r.signer);
            let what = if r.signer == "kubernetes" {
                "cluster        "
            } else {
                "CA certificate "
            };
            println!(
                "{what} {}{}",
                r.signer_detail,
                if r.created_ca { " (created now)" } else { "" }
            );
            println!(
                "kubeconfigs     {} (from {})",
                r.kubeconfig_server, r.kubeconfig_server_source
            );
        }
    }
}
