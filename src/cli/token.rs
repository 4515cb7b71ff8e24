//! `rotator token create|list|revoke`.
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::CliResult;
use super::output::{self, OutputFormat, time};
use crate::app::App;
use crate::flows::bootstrap_tokens::{self, CreateToken};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a bootstrap token in kube-system and print it once.
    Create {
        /// Lifetime, such as 30m or 24h (default policy.default_token_ttl); 0 never expires (if policy allows).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long, default_value = "")]
        description: String,
        /// Extra groups, each system:bootstrappers:<name> (comma-separated or repeated).
        #[arg(long = "groups", value_delimiter = ',')]
        groups: Vec<String>,
        /// authentication, signing, or both (default both).
        #[arg(long = "usage", value_delimiter = ',')]
        usages: Vec<String>,
    },
    /// List rotator's tokens, and every other bootstrap token in the cluster, marked foreign.
    List,
    /// Delete a token rotator created.
    Revoke { id: String },
}

pub async fn run(app: &App, cmd: &TokenCommand, out: OutputFormat) -> CliResult {
    match cmd {
        TokenCommand::Create {
            ttl,
            description,
            groups,
            usages,
        } => {
            let req = CreateToken {
                ttl: *ttl,
                description: description.clone(),
                groups: groups.clone(),
                usages: usages.clone(),
            };
            let c = bootstrap_tokens::create(app, &req).await?;
            let expires = c.expires_at.map(time).unwrap_or_else(|| "never".into());
            match out {
                OutputFormat::Json => output::json(
                    &json!({"id": c.id, "token": c.token.as_str(), "expires": expires}),
                ),
                OutputFormat::Table => {
                    // The token alone on stdout, so `$(rotator token create)` captures just it.
                    println!("{}", c.token.as_str());
                    eprintln!(
                        "bootstrap token {} created in kube-system, expires {expires}; it is shown only now",
                        c.id
                    );
                }
            }
            Ok(())
        }
        TokenCommand::List => {
            let list = bootstrap_tokens::list(app).await?;
            match out {
                OutputFormat::Json => output::json(&list),
                OutputFormat::Table => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                if t.foreign {
                                    "foreign".into()
                                } else {
                                    "rotator".into()
                                },
                                t.state.clone(),
                                t.expires.clone(),
                                t.usages.join(","),
                                t.groups.join(","),
                                t.description.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &[
                            "ID",
                            "OWNER",
                            "STATE",
                            "EXPIRES",
                            "USAGES",
                            "GROUPS",
                            "DESCRIPTION",
                        ],
                        &rows,
                    );
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            bootstrap_tokens::revoke(app, id).await?;
            if out == OutputFormat::Json {
                output::json(&json!({"id": id, "revoked": true}));
            } else {
                println!("bootstrap token {id} revoked and deleted from the cluster");
            }
            Ok(())
        }
    }
}
