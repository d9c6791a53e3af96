//! A caching decorator over any [`Store`]: the small, hot collections in
//! memory.
//!
//! Every API call authenticates a token, and every VM create resolves its
//! image and the site or provider it is pinned to. Those are a few hundred
//! rows at most (images, sites, providers) plus one token per host, read
//! thousands of times a second under load; going to the database for each
//! read costs a blocking-pool round trip and a query. [`CachedStore`] keeps
//! them in memory and forwards everything else untouched.
//!
//! - Providers, sites and images are loaded whole when the store opens and
//!   written through: the cache is updated after the inner store committed,
//!   under one lock per collection held across the write, so the cache sees
//!   writes in their durable order.
//! - Tokens are cached on first use, admin, host and user tokens (a join
//!   token's remaining uses change with every join, so those are always read
//!   from the database). A deleted host's tokens leave the cache with it, a
//!   rotated admin token with its rotation, and a revoked user token (also
//!   one deleted with its user or project) with its deletion.
//!
//! This assumes one control plane process owns the database (true of the
//! embedded SQLite store). A highly available control plane with several
//! processes on one database would invalidate through the database's
//! change notifications instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use virt8ra_api::{
    AuditRecord, Host, Image, Migration, Network, Provider, ResidencyInterval, Site, Vm, VmEvent,
    VmExport,
};

use crate::error::{Result, StoreError};
use crate::records::{AuditFilter, TokenKind, TokenRecord, VmFilter};
use crate::store::Store;

/// A resource kept in a [`Catalog`]: found by id or name, listed by name.
trait Named: Clone {
    fn id(&self) -> &str;
    fn name(&self) -> &str;
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn id(&self) -> &str { &self.id }
            fn name(&self) -> &str { &self.name }
        }
    )*};
}
named!(Provider, Site, Image);

/// One collection: ordered by name (the store's list order), with an id
/// lookup.
struct Catalog<T> {
    by_name: BTreeMap<String, T>,
    /// id -> name
    names: HashMap<String, String>,
}

impl<T: Named> Catalog<T> {
    fn new(items: Vec<T>) -> Catalog<T> {
        let mut c = Catalog {
            by_name: BTreeMap::new(),
            names: HashMap::new(),
        };
        for i in items {
            c.put(i);
        }
        c
    }

    fn put(&mut self, item: T) {
        if let Some(old) = self
            .names
            .insert(item.id().to_string(), item.name().to_string())
        {
            if old != item.name() {
                self.by_name.remove(&old);
            }
        }
        self.by_name.insert(item.name().to_string(), item);
    }

    fn remove(&mut self, id: &str) {
        if let Some(name) = self.names.remove(id) {
            self.by_name.remove(&name);
        }
    }

    /// By id, or by name (as the database's `id = ?1 OR name = ?1`).
    fn get(&self, key: &str) -> Option<&T> {
        match self.names.get(key) {
            Some(name) => self.by_name.get(name),
            None => self.by_name.get(key),
        }
    }

    fn list(&self) -> Vec<T> {
        self.by_name.values().cloned().collect()
    }
}

struct Cached<T> {
    items: RwLock<Catalog<T>>,
    /// Held across a write to the inner store and the cache update after
    /// it, so that two writes of the same collection reach the cache in the
    /// order they became durable.
    writes: tokio::sync::Mutex<()>,
}

impl<T: Named> Cached<T> {
    fn new(items: Vec<T>) -> Cached<T> {
        Cached {
            items: RwLock::new(Catalog::new(items)),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Catalog<T>> {
        // Updates are single map operations that leave the maps consistent,
        // so a poisoned lock is still usable.
        self.items.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Catalog<T>> {
        self.items.write().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, kind: &'static str, key: &str) -> Result<T> {
        self.read()
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::not_found(kind, key))
    }
}

pub struct CachedStore<S> {
    inner: S,
    providers: Cached<Provider>,
    sites: Cached<Site>,
    images: Cached<Image>,
    /// Admin and host tokens by hash.
    tokens: RwLock<HashMap<String, TokenRecord>>,
}

fn cacheable(t: &TokenRecord) -> bool {
    matches!(t.kind, TokenKind::Admin | TokenKind::Host | TokenKind::User)
}

impl<S: Store> CachedStore<S> {
    /// Wraps `inner`, loading its providers, sites and images.
    pub async fn new(inner: S) -> Result<CachedStore<S>> {
        Ok(CachedStore {
            providers: Cached::new(inner.list_providers().await?),
            sites: Cached::new(inner.list_sites().await?),
            images: Cached::new(inner.list_images().await?),
            tokens: RwLock::new(HashMap::new()),
            inner,
        })
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn tokens(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl<S: Store> Store for CachedStore<S> {
    async fn create_provider(&self, p: &Provider) -> Result<()> {
        let _w = self.providers.writes.lock().await;
        self.inner.create_provider(p).await?;
        self.providers.write().put(p.clone());
        Ok(())
    }

    async fn list_providers(&self) -> Result<Vec<Provider>> {
        Ok(self.providers.read().list())
    }

    async fn get_provider(&self, key: &str) -> Result<Provider> {
        self.providers.get("provider", key)
    }

    async fn delete_provider(&self, id: &str) -> Result<()> {
        let _w = self.providers.writes.lock().await;
        self.inner.delete_provider(id).await?;
        self.providers.write().remove(id);
        Ok(())
    }

    async fn update_provider(&self, p: &Provider) -> Result<()> {
        let _w = self.providers.writes.lock().await;
        self.inner.update_provider(p).await?;
        self.providers.write().put(p.clone());
        Ok(())
    }

    async fn create_site(&self, s: &Site) -> Result<()> {
        let _w = self.sites.writes.lock().await;
        self.inner.create_site(s).await?;
        self.sites.write().put(s.clone());
        Ok(())
    }

    async fn list_sites(&self) -> Result<Vec<Site>> {
        Ok(self.sites.read().list())
    }

    async fn get_site(&self, key: &str) -> Result<Site> {
        self.sites.get("site", key)
    }

    async fn delete_site(&self, id: &str) -> Result<()> {
        let _w = self.sites.writes.lock().await;
        self.inner.delete_site(id).await?;
        self.sites.write().remove(id);
        Ok(())
    }

    async fn update_site(&self, s: &Site) -> Result<()> {
        let _w = self.sites.writes.lock().await;
        self.inner.update_site(s).await?;
        self.sites.write().put(s.clone());
        Ok(())
    }

    // Networks are read when VMs with NICs are created or moved, not per
    // request: forwarded.
    async fn create_network(&self, n: &Network) -> Result<Network> {
        self.inner.create_network(n).await
    }

    async fn list_networks(&self) -> Result<Vec<Network>> {
        self.inner.list_networks().await
    }

    async fn get_network(&self, key: &str) -> Result<Network> {
        self.inner.get_network(key).await
    }

    async fn delete_network(&self, id: &str) -> Result<()> {
        self.inner.delete_network(id).await
    }

    async fn used_ips(&self, network_id: &str) -> Result<BTreeSet<Ipv4Addr>> {
        self.inner.used_ips(network_id).await
    }

    async fn create_host(
        &self,
        h: &Host,
        host_token: &TokenRecord,
        join_token_id: &str,
    ) -> Result<()> {
        self.inner.create_host(h, host_token, join_token_id).await?;
        if cacheable(host_token) {
            self.tokens()
                .insert(host_token.hash.clone(), host_token.clone());
        }
        Ok(())
    }

    async fn update_host(&self, h: &Host) -> Result<()> {
        self.inner.update_host(h).await
    }

    async fn list_hosts(&self) -> Result<Vec<Host>> {
        self.inner.list_hosts().await
    }

    async fn get_host(&self, key: &str) -> Result<Host> {
        self.inner.get_host(key).await
    }

    async fn delete_host(&self, id: &str) -> Result<()> {
        // Out of the cache before the delete (a token must not outlive its
        // host, even between the commit and the cache update) and after it
        // (a lookup that read the token before the delete may have cached
        // it meanwhile; `find_token` re-checks host tokens it caches).
        let forget = || {
            self.tokens()
                .retain(|_, t| t.host_id.as_deref() != Some(id))
        };
        forget();
        let r = self.inner.delete_host(id).await;
        forget();
        r
    }

    async fn create_image(&self, i: &Image) -> Result<()> {
        let _w = self.images.writes.lock().await;
        self.inner.create_image(i).await?;
        self.images.write().put(i.clone());
        Ok(())
    }

    async fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.images.read().list())
    }

    async fn get_image(&self, key: &str) -> Result<Image> {
        self.images.get("image", key)
    }

    async fn delete_image(&self, id: &str) -> Result<()> {
        let _w = self.images.writes.lock().await;
        self.inner.delete_image(id).await?;
        self.images.write().remove(id);
        Ok(())
    }

    async fn update_image(&self, i: &Image) -> Result<()> {
        let _w = self.images.writes.lock().await;
        self.inner.update_image(i).await?;
        self.images.write().put(i.clone());
        Ok(())
    }

    async fn create_vm(&self, vm: &Vm, events: &[&str]) -> Result<()> {
        self.inner.create_vm(vm, events).await
    }

    async fn update_vm(&self, vm: &Vm, event: Option<&str>) -> Result<()> {
        self.inner.update_vm(vm, event).await
    }

    async fn get_vm(&self, key: &str) -> Result<Vm> {
        self.inner.get_vm(key).await
    }

    async fn list_vms(&self, f: &VmFilter) -> Result<Vec<Vm>> {
        self.inner.list_vms(f).await
    }

    async fn vm_events(&self, vm_id: &str) -> Result<Vec<VmEvent>> {
        self.inner.vm_events(vm_id).await
    }

    async fn create_migration(&self, m: &Migration, vm: &Vm, event: &str) -> Result<()> {
        self.inner.create_migration(m, vm, event).await
    }

    async fn update_migration(
        &self,
        m: &Migration,
        vm: Option<&Vm>,
        event: Option<&str>,
    ) -> Result<()> {
        self.inner.update_migration(m, vm, event).await
    }

    async fn get_migration(&self, id: &str) -> Result<Migration> {
        self.inner.get_migration(id).await
    }

    async fn list_migrations(&self, vm_id: Option<&str>, active: bool) -> Result<Vec<Migration>> {
        self.inner.list_migrations(vm_id, active).await
    }

    async fn put_export(&self, e: &VmExport) -> Result<()> {
        self.inner.put_export(e).await
    }

    async fn get_export(&self, id: &str) -> Result<VmExport> {
        self.inner.get_export(id).await
    }

    async fn append_audit(&self, r: &AuditRecord) -> Result<u64> {
        self.inner.append_audit(r).await
    }

    async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.inner.list_audit(f).await
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<usize> {
        self.inner.prune_audit(before).await
    }

    async fn vm_residency(&self, vm_id: &str) -> Result<Vec<ResidencyInterval>> {
        self.inner.vm_residency(vm_id).await
    }

    async fn residency_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ResidencyInterval>> {
        self.inner.residency_between(from, to).await
    }

    async fn create_token(&self, t: &TokenRecord) -> Result<()> {
        self.inner.create_token(t).await?;
        if cacheable(t) {
            self.tokens().insert(t.hash.clone(), t.clone());
        }
        Ok(())
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hit = self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .cloned();
        if hit.is_some() {
            return Ok(hit);
        }
        let found = self.inner.find_token(hash).await?;
        if let Some(t) = found.as_ref().filter(|t| cacheable(t)) {
            // A host deleted (or an admin token rotated) while this read
            // ran must not come back: cache the token only while the
            // database still has it.
            self.tokens().insert(t.hash.clone(), t.clone());
            if self.inner.find_token(hash).await?.is_none() {
                self.tokens().remove(hash);
                return Ok(None);
            }
        }
        Ok(found)
    }

    async fn count_tokens(&self, kind: TokenKind) -> Result<usize> {
        self.inner.count_tokens(kind).await
    }

    async fn list_tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>> {
        self.inner.list_tokens(kind).await
    }

    async fn delete_token(&self, kind: TokenKind, id: &str) -> Result<bool> {
        // Out of the cache before and after the delete, as a host's tokens.
        let forget = || self.tokens().retain(|_, t| t.id != id);
        forget();
        let r = self.inner.delete_token(kind, id).await;
        forget();
        r
    }

    async fn purge_join_tokens(&self, now: chrono::DateTime<chrono::Utc>) -> Result<usize> {
        // Join tokens are never cached.
        self.inner.purge_join_tokens(now).await
    }

    async fn replace_tokens(&self, t: &TokenRecord) -> Result<()> {
        // The old tokens leave the cache before the commit (none may work
        // after it) and again after it (a lookup that read one before the
        // commit may have cached it meanwhile; `find_token` re-checks).
        let forget = || self.tokens().retain(|_, c| c.kind != t.kind);
        forget();
        let r = self.inner.replace_tokens(t).await;
        forget();
        r?;
        if cacheable(t) {
            self.tokens().insert(t.hash.clone(), t.clone());
        }
        Ok(())
    }

    async fn put_doc(&self, kind: &str, id: &str, name: &str, body: &str) -> Result<()> {
        self.inner.put_doc(kind, id, name, body).await
    }

    async fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>> {
        self.inner.get_doc(kind, key).await
    }

    async fn list_docs(&self, kind: &str) -> Result<Vec<String>> {
        self.inner.list_docs(kind).await
    }

    async fn delete_doc(&self, kind: &str, id: &str) -> Result<bool> {
        self.inner.delete_doc(kind, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use chrono::Utc;

    fn provider(id: &str, name: &str, country: &str) -> Provider {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": name, "country": country, "jurisdiction": "EU",
            "created_at": Utc::now(),
        }))
        .expect("provider")
    }

    #[tokio::test]
    async fn catalogs_follow_writes_and_list_by_name() {
        let inner = SqliteStore::in_memory().expect("store");
        inner
            .create_provider(&provider("p1", "zeta", "DE"))
            .await
            .expect("create");
        let s = CachedStore::new(inner).await.expect("cached");
        s.create_provider(&provider("p2", "alpha", "ES"))
            .await
            .expect("create");
        let names: Vec<String> = s
            .list_providers()
            .await
            .expect("list")
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(s.get_provider("p1").await.expect("by id").name, "zeta");
        assert_eq!(s.get_provider("alpha").await.expect("by name").id, "p2");
        s.update_provider(&provider("p1", "zeta", "PL"))
            .await
            .expect("update");
        assert_eq!(s.get_provider("zeta").await.expect("get").country, "PL");
        assert_eq!(
            s.inner().get_provider("zeta").await.expect("db").country,
            "PL"
        );
        // A refused write changes nothing in the cache either.
        assert!(s
            .create_provider(&provider("p3", "alpha", "FR"))
            .await
            .is_err());
        assert!(s.get_provider("p3").await.is_err());
        assert_eq!(s.get_provider("alpha").await.expect("get").country, "ES");
        s.delete_provider("p2").await.expect("delete");
        assert!(matches!(
            s.get_provider("alpha").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn join_tokens_are_always_read_from_the_database() {
        let s = CachedStore::new(SqliteStore::in_memory().expect("store"))
            .await
            .expect("cached");
        let tok = |id: &str, kind, hash: &str| TokenRecord {
            id: id.into(),
            kind,
            hash: hash.into(),
            site: None,
            host_id: None,
            expires_at: None,
            uses_left: Some(1),
            created_at: Utc::now(),
            grant: None,
        };
        s.create_token(&tok("a", TokenKind::Admin, "ha"))
            .await
            .expect("admin");
        s.create_token(&tok("j", TokenKind::Join, "hj"))
            .await
            .expect("join");
        assert!(s.tokens.read().expect("lock").contains_key("ha"));
        assert!(!s.tokens.read().expect("lock").contains_key("hj"));
        assert_eq!(
            s.find_token("hj").await.expect("find").map(|t| t.id),
            Some("j".to_string())
        );
        assert!(!s.tokens.read().expect("lock").contains_key("hj"));
        assert!(s.find_token("nope").await.expect("find").is_none());
    }

    #[tokio::test]
    async fn a_revoked_user_token_stops_working_at_once() {
        let s = CachedStore::new(SqliteStore::in_memory().expect("store"))
            .await
            .expect("cached");
        let t = TokenRecord {
            id: "u1".into(),
            kind: TokenKind::User,
            hash: "h-u1".into(),
            site: None,
            host_id: None,
            expires_at: None,
            uses_left: None,
            created_at: Utc::now(),
            grant: Some(crate::TokenGrant {
                user: "ana".into(),
                scope: "project:p".into(),
                role: "member".into(),
                name: "ci".into(),
            }),
        };
        s.create_token(&t).await.expect("create");
        assert_eq!(s.find_token("h-u1").await.expect("find"), Some(t.clone()));
        assert!(s.tokens.read().expect("lock").contains_key("h-u1"));
        assert!(s.delete_token(TokenKind::User, "u1").await.expect("delete"));
        assert!(s.find_token("h-u1").await.expect("find").is_none());
        assert!(!s.tokens.read().expect("lock").contains_key("h-u1"));
    }

    #[tokio::test]
    async fn a_replaced_admin_token_stops_working_at_once() {
        let s = CachedStore::new(SqliteStore::in_memory().expect("store"))
            .await
            .expect("cached");
        let tok = |id: &str, hash: &str| TokenRecord {
            id: id.into(),
            kind: TokenKind::Admin,
            hash: hash.into(),
            site: None,
            host_id: None,
            expires_at: None,
            uses_left: None,
            created_at: Utc::now(),
            grant: None,
        };
        s.create_token(&tok("old", "h-old")).await.expect("create");
        // Cached by the lookup.
        assert!(s.find_token("h-old").await.expect("find").is_some());
        s.replace_tokens(&tok("new", "h-new"))
            .await
            .expect("replace");
        assert!(s.find_token("h-old").await.expect("find").is_none());
        assert!(s.inner().find_token("h-old").await.expect("db").is_none());
        assert_eq!(
            s.find_token("h-new").await.expect("find").map(|t| t.id),
            Some("new".to_string())
        );
        assert_eq!(s.count_tokens(TokenKind::Admin).await.expect("count"), 1);
        // Revoking by id takes a cached token out too.
        assert!(s
            .delete_token(TokenKind::Admin, "new")
            .await
            .expect("delete"));
        assert!(s.find_token("h-new").await.expect("find").is_none());
        assert!(!s
            .delete_token(TokenKind::Admin, "new")
            .await
            .expect("delete"));
    }
}
