//! Which rotator instance a database belongs to: its id in the database's
//! `meta` and in the data directory's marker, so a lost, emptied or foreign
//! database is noticed instead of silently used.
use std::path::PathBuf;

use serde_json::json;

use super::{AppError, DatabaseMode};
use crate::config::Settings;
use crate::store::{Store, StoreError, audit, meta};

/// `DATA_DIR/instance`: written at the first initialization, so a lost or
/// emptied database is noticed instead of silently recreated.
fn marker_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("instance")
}

pub(super) fn read_marker(data_dir: &std::path::Path) -> Result<Option<String>, AppError> {
    let path = marker_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s
            .lines()
            .find_map(|l| l.strip_prefix("instance "))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AppError::File {
            what: "instance marker",
            path,
            reason: e.to_string(),
            fix: "make the data directory readable by rotator",
        }),
    }
}

pub(super) fn write_marker(data_dir: &std::path::Path, instance: &str) -> Result<(), AppError> {
    let path = marker_path(data_dir);
    let text = format!(
        "# rotator data directory: the database here belongs to this instance.\n# Do not edit; a database without it is refused.\ninstance {instance}\n"
    );
    crate::support::fsutil::write_public_atomic(&path, text.as_bytes()).map_err(|source| {
        AppError::DataDir {
            path: path.clone(),
            source,
        }
    })
}

/// Refuses a database that is not the one this data directory was
/// initialized with (another instance's, or a new empty one), unless
/// `init --new-database` asked for a new one.
pub(super) fn check(
    settings: &Settings,
    shown: &str,
    marker: Option<&String>,
    found: Option<&String>,
    mode: DatabaseMode,
) -> Result<(), AppError> {
    match (marker, found, mode) {
        (Some(expected), Some(found), DatabaseMode::Existing) if expected != found => {
            Err(AppError::ForeignDatabase {
                dir: settings.data_dir.clone(),
                db: shown.to_string(),
                found: found.clone(),
                expected: expected.clone(),
            })
        }
        // A database with tables but no instance: recreated behind rotator's back.
        (Some(expected), None, DatabaseMode::Existing) => Err(AppError::DatabaseLost {
            dir: settings.data_dir.clone(),
            db: shown.to_string(),
            instance: expected.clone(),
            what: "a new, empty one (its instance id is missing)",
        }),
        _ => Ok(()),
    }
}

/// Gives a database without an instance id one, and returns the id it has:
/// when several processes start at once on a new database (two replicas),
/// the first to commit wins and the others take its id, so every data
/// directory's marker and every cluster object names one instance.
pub(super) async fn claim(
    store: &Store,
    now: i64,
    actor: &str,
    previous: Option<&str>,
    mode: DatabaseMode,
) -> Result<String, AppError> {
    let id = crate::pki::hex(&crate::pki::random_bytes::<8>());
    let mut tx = store.begin().await?;
    if !meta::insert_new(&mut tx, meta::INSTANCE_ID, &id).await? {
        drop(tx);
        let mut conn = store.conn().await?;
        return meta::get(&mut conn, meta::INSTANCE_ID).await?.ok_or_else(|| {
            StoreError::Invalid(
                "another process gave the database an instance id and it vanished; start rotator again"
                    .into(),
            )
            .into()
        });
    }
    audit::append(
        &mut tx,
        now,
        actor,
        "store.instance",
        "rotator",
        json!({"instance": id, "previous": previous, "new_database": mode == DatabaseMode::New}),
    )
    .await?;
    crate::store::commit(tx).await?;
    Ok(id)
}
