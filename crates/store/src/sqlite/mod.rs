//! The embedded SQLite backend.
//!
//! Writes go to one writer thread that commits everything queued at the same
//! time in one transaction (group commit), each write in its own savepoint
//! (the VM writes, the hot path, without one: see [`engine::unguarded`]), and
//! answers each write only after that commit is on disk (WAL,
//! `synchronous=FULL`): many concurrent writes share one fsync, and none is
//! acknowledged before it is durable. Reads use a second connection, which
//! WAL lets read while the writer writes.
//!
//! One file per resource ([`providers`], [`sites`], [`hosts`], [`images`],
//! [`vms`], [`moves`] (VM migrations), [`networks`] (with their address
//! leases), [`exports`], [`audit`] (the audit log and the residency trail), [`tokens`], [`documents`]) holds that resource's SQL; [`engine`] holds the
//! connections, the writer thread and the checkpointer; [`rows`] the helpers
//! the resource files share. This file only routes each [`Store`] method to
//! its resource file. Imports run one way: this file to the resource files,
//! those to `engine` and `rows` (and `hosts` to `tokens`, `moves` to `vms`, `vms` to `networks`, `vms`, `moves` and `exports` to `audit`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use virt8ra_api::{
    AuditRecord, Host, Image, Migration, Network, Provider, ResidencyInterval, Site, Vm, VmEvent,
    VmExport,
};

use crate::error::Result;
use crate::records::{AuditFilter, TokenKind, TokenRecord, VmFilter};
use crate::store::Store;

mod audit;
mod documents;
mod engine;
mod exports;
mod hosts;
mod images;
mod moves;
mod networks;
mod providers;
mod rows;
mod sites;
mod tokens;
mod vms;

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) use engine::upgrade_schema_to;
pub use engine::{CommitHook, SqliteStore};

#[async_trait]
impl Store for SqliteStore {
    async fn create_provider(&self, p: &Provider) -> Result<()> {
        providers::create_provider(self, p).await
    }

    async fn list_providers(&self) -> Result<Vec<Provider>> {
        providers::list_providers(self).await
    }

    async fn get_provider(&self, key: &str) -> Result<Provider> {
        providers::get_provider(self, key).await
    }

    async fn delete_provider(&self, id: &str) -> Result<()> {
        providers::delete_provider(self, id).await
    }

    async fn update_provider(&self, p: &Provider) -> Result<()> {
        providers::update_provider(self, p).await
    }

    async fn create_site(&self, s: &Site) -> Result<()> {
        sites::create_site(self, s).await
    }

    async fn list_sites(&self) -> Result<Vec<Site>> {
        sites::list_sites(self).await
    }

    async fn get_site(&self, key: &str) -> Result<Site> {
        sites::get_site(self, key).await
    }

    async fn delete_site(&self, id: &str) -> Result<()> {
        sites::delete_site(self, id).await
    }

    async fn update_site(&self, s: &Site) -> Result<()> {
        sites::update_site(self, s).await
    }

    async fn create_network(&self, n: &Network) -> Result<Network> {
        networks::create_network(self, n).await
    }

    async fn list_networks(&self) -> Result<Vec<Network>> {
        networks::list_networks(self).await
    }

    async fn get_network(&self, key: &str) -> Result<Network> {
        networks::get_network(self, key).await
    }

    async fn delete_network(&self, id: &str) -> Result<()> {
        networks::delete_network(self, id).await
    }

    async fn used_ips(&self, network_id: &str) -> Result<BTreeSet<Ipv4Addr>> {
        networks::used_ips(self, network_id).await
    }

    async fn create_host(
        &self,
        h: &Host,
        host_token: &TokenRecord,
        join_token_id: &str,
    ) -> Result<()> {
        hosts::create_host(self, h, host_token, join_token_id).await
    }

    async fn update_host(&self, h: &Host) -> Result<()> {
        hosts::update_host(self, h).await
    }

    async fn list_hosts(&self) -> Result<Vec<Host>> {
        hosts::list_hosts(self).await
    }

    async fn get_host(&self, key: &str) -> Result<Host> {
        hosts::get_host(self, key).await
    }

    async fn delete_host(&self, id: &str) -> Result<()> {
        hosts::delete_host(self, id).await
    }

    async fn create_image(&self, i: &Image) -> Result<()> {
        images::create_image(self, i).await
    }

    async fn list_images(&self) -> Result<Vec<Image>> {
        images::list_images(self).await
    }

    async fn get_image(&self, key: &str) -> Result<Image> {
        images::get_image(self, key).await
    }

    async fn delete_image(&self, id: &str) -> Result<()> {
        images::delete_image(self, id).await
    }

    async fn update_image(&self, i: &Image) -> Result<()> {
        images::update_image(self, i).await
    }

    async fn create_vm(&self, vm: &Vm, events: &[&str]) -> Result<()> {
        vms::create_vm(self, vm, events).await
    }

    async fn update_vm(&self, vm: &Vm, event: Option<&str>) -> Result<()> {
        vms::update_vm(self, vm, event).await
    }

    async fn create_migration(&self, m: &Migration, vm: &Vm, event: &str) -> Result<()> {
        moves::create_migration(self, m, vm, event).await
    }

    async fn update_migration(
        &self,
        m: &Migration,
        vm: Option<&Vm>,
        event: Option<&str>,
    ) -> Result<()> {
        moves::update_migration(self, m, vm, event).await
    }

    async fn get_migration(&self, id: &str) -> Result<Migration> {
        moves::get_migration(self, id).await
    }

    async fn list_migrations(&self, vm_id: Option<&str>, active: bool) -> Result<Vec<Migration>> {
        moves::list_migrations(self, vm_id, active).await
    }

    async fn put_export(&self, e: &VmExport) -> Result<()> {
        exports::put_export(self, e).await
    }

    async fn get_export(&self, id: &str) -> Result<VmExport> {
        exports::get_export(self, id).await
    }

    async fn get_vm(&self, key: &str) -> Result<Vm> {
        vms::get_vm(self, key).await
    }

    async fn list_vms(&self, f: &VmFilter) -> Result<Vec<Vm>> {
        vms::list_vms(self, f).await
    }

    async fn vm_events(&self, vm_id: &str) -> Result<Vec<VmEvent>> {
        vms::vm_events(self, vm_id).await
    }

    async fn create_token(&self, t: &TokenRecord) -> Result<()> {
        tokens::create_token(self, t).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        tokens::find_token(self, hash).await
    }

    async fn list_tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>> {
        tokens::list_tokens(self, kind).await
    }

    async fn delete_token(&self, kind: TokenKind, id: &str) -> Result<bool> {
        tokens::delete_token(self, kind, id).await
    }

    async fn purge_join_tokens(&self, now: DateTime<Utc>) -> Result<usize> {
        tokens::purge_join_tokens(self, now).await
    }

    async fn replace_tokens(&self, t: &TokenRecord) -> Result<()> {
        tokens::replace_tokens(self, t).await
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<usize> {
        tokens::count_tokens(self, kind).await
    }

    async fn put_doc(&self, kind: &str, id: &str, name: &str, body: &str) -> Result<()> {
        documents::put_doc(self, kind, id, name, body).await
    }

    async fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>> {
        documents::get_doc(self, kind, key).await
    }

    async fn list_docs(&self, kind: &str) -> Result<Vec<String>> {
        documents::list_docs(self, kind).await
    }

    async fn delete_doc(&self, kind: &str, id: &str) -> Result<bool> {
        documents::delete_doc(self, kind, id).await
    }

    async fn append_audit(&self, r: &AuditRecord) -> Result<u64> {
        audit::append_audit(self, r).await
    }

    async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        audit::list_audit(self, f).await
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<usize> {
        audit::prune_audit(self, before).await
    }

    async fn vm_residency(&self, vm_id: &str) -> Result<Vec<ResidencyInterval>> {
        audit::vm_residency(self, vm_id).await
    }

    async fn residency_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ResidencyInterval>> {
        audit::residency_between(self, from, to).await
    }
}
