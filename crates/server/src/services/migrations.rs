//! Reading migrations and exports: the store's records, with the progress
//! of running ones from memory (the store has it with a delay). Starting,
//! stepping and undoing them is the workflows' (`crate::workflows`).

use virt8ra_api::{Migration, VmExport};

use crate::error::ApiResult;
use crate::state::Ctx;

/// Migrations, of one VM (name or id) when `vm` is given, only unfinished
/// ones when `active`.
pub async fn list(app: &Ctx, vm: Option<&str>, active: bool) -> ApiResult<Vec<Migration>> {
    let vm_id = match vm {
        Some(k) => Some(app.store.get_vm(k).await?.id),
        None => None,
    };
    let mut items = app.store.list_migrations(vm_id.as_deref(), active).await?;
    fresher(app, &mut items);
    Ok(items)
}

/// Migration `id`, live when it is running.
pub async fn get(app: &Ctx, id: &str) -> ApiResult<Migration> {
    if let Some(m) = app.migrations.active().into_iter().find(|m| m.id == id) {
        return Ok(m);
    }
    Ok(app.store.get_migration(id).await?)
}

/// A VM's migrations, oldest first: where its data has been.
pub async fn history(app: &Ctx, vm: &str) -> ApiResult<Vec<Migration>> {
    let vm = app.store.get_vm(vm).await?;
    let mut items = app.store.list_migrations(Some(&vm.id), false).await?;
    fresher(app, &mut items);
    Ok(items)
}

/// Export `id`.
pub async fn export(app: &Ctx, id: &str) -> ApiResult<VmExport> {
    Ok(app.store.get_export(id).await?)
}

/// Running migrations' progress lives in memory; the store has it with a delay.
fn fresher(app: &Ctx, items: &mut [Migration]) {
    let live = app.migrations.active();
    for m in items.iter_mut() {
        if let Some(l) = live.iter().find(|l| l.id == m.id) {
            *m = l.clone();
        }
    }
}
