use super::{Store, StoreError, Write};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("ladder");

/// The embedded store: one redb file. redb's file lock keeps a second coordinator off it.
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Backend {
            store: format!("redb:{}", path.display()),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let db = Database::create(path).map_err(|e| fail(&e))?;
        let txn = db.begin_write().map_err(|e| fail(&e))?;
        txn.open_table(TABLE).map_err(|e| fail(&e))?;
        txn.commit().map_err(|e| fail(&e))?;
        Ok(RedbStore {
            db: Arc::new(db),
            path: path.to_owned(),
        })
    }

    /// Runs blocking redb work off the async threads.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, Box<dyn std::error::Error + Send + Sync>>
        + Send
        + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let result = tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        result.map_err(|message| StoreError::Backend {
            store: self.describe(),
            message,
        })
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            Ok(table.get(key.as_str())?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn transaction(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.run(move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(TABLE)?;
                for write in &writes {
                    match write {
                        Write::Put(key, value) => {
                            table.insert(key.as_str(), value.as_slice())?;
                        }
                        Write::Delete(key) => {
                            table.remove(key.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        self.run(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }
}
