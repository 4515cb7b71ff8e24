//! A table's columns and their declared types, read from the database's own
//! catalogue: what a copy binds each value as. The first value seen says
//! nothing (a NULL decodes as any type, and PostgreSQL refuses a NULL bound
//! as an integer into a text column), so the declared type decides.
use super::{Conn, Engine, StoreError};

/// The two kinds of value rotator's schema declares on either engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Integer,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: Kind,
    /// As the catalogue spells it, for messages.
    pub declared: String,
}

/// The kind a declared type stores, by the engine's own affinity rules
/// (SQLite: a type containing INT is an integer, CHAR/CLOB/TEXT is text).
pub fn kind_of(declared: &str) -> Option<Kind> {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        Some(Kind::Integer)
    } else if t.contains("TEXT") || t.contains("CHAR") || t.contains("CLOB") {
        Some(Kind::Text)
    } else {
        None
    }
}

/// `table`'s columns in their declared order.
pub async fn columns(
    conn: &mut Conn,
    engine: Engine,
    table: &str,
) -> Result<Vec<Column>, StoreError> {
    let sql = match engine {
        Engine::Sqlite => "SELECT name, type FROM pragma_table_info($1) ORDER BY cid",
        Engine::Postgres => {
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
        }
    };
    let rows: Vec<(String, String)> = sqlx::query_as(sql).bind(table).fetch_all(conn).await?;
    if rows.is_empty() {
        return Err(StoreError::Invalid(format!("table {table} does not exist")));
    }
    rows.into_iter()
        .map(|(name, declared)| match kind_of(&declared) {
            Some(kind) => Ok(Column {
                name,
                kind,
                declared,
            }),
            None => Err(StoreError::Invalid(format!(
                "column {table}.{name} is declared {declared:?}, neither integer nor text; rotator cannot copy it"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_of_both_engines_map_to_their_kind() {
        for (t, k) in [
            ("INTEGER", Some(Kind::Integer)),
            ("bigint", Some(Kind::Integer)),
            ("integer", Some(Kind::Integer)),
            ("TEXT", Some(Kind::Text)),
            ("text", Some(Kind::Text)),
            ("character varying", Some(Kind::Text)),
            ("BLOB", None),
            ("boolean", None),
        ] {
            assert_eq!(kind_of(t), k, "{t}");
        }
    }
}
