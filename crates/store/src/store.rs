//! The [`Store`] trait: every read and write of the control plane's durable
//! state, which each backend implements whole.

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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // providers
    async fn create_provider(&self, p: &Provider) -> Result<()>;
    async fn list_providers(&self) -> Result<Vec<Provider>>;
    /// By id or name.
    async fn get_provider(&self, key: &str) -> Result<Provider>;
    /// Refused while sites belong to it.
    async fn delete_provider(&self, id: &str) -> Result<()>;
    /// Replaces the provider's body (its id and name do not change).
    async fn update_provider(&self, p: &Provider) -> Result<()>;

    // sites
    async fn create_site(&self, s: &Site) -> Result<()>;
    async fn list_sites(&self) -> Result<Vec<Site>>;
    async fn get_site(&self, key: &str) -> Result<Site>;
    /// Refused while hosts belong to it.
    async fn delete_site(&self, id: &str) -> Result<()>;
    /// Replaces the site's body (its id, name and provider do not change).
    async fn update_site(&self, s: &Site) -> Result<()>;

    // networks
    /// Creates the network; one with `vni` 0 gets the lowest free VNI.
    /// Returns it as stored.
    async fn create_network(&self, n: &Network) -> Result<Network>;
    async fn list_networks(&self) -> Result<Vec<Network>>;
    /// By id or name.
    async fn get_network(&self, key: &str) -> Result<Network>;
    /// Refused while NICs hold addresses on it.
    async fn delete_network(&self, id: &str) -> Result<()>;
    /// The addresses held on the network. A VM's NICs (`status.nics`) are
    /// leases written with the VM by `create_vm` and `update_vm`: an
    /// address another NIC holds is a conflict there (so IPAM picks from
    /// this set and picks again on a conflict), and a deleted VM's leases
    /// are released.
    async fn used_ips(&self, network_id: &str) -> Result<BTreeSet<Ipv4Addr>>;

    // hosts
    /// Creates the host and its credential in one transaction, and consumes
    /// one use of the join token that admitted it.
    async fn create_host(
        &self,
        h: &Host,
        host_token: &TokenRecord,
        join_token_id: &str,
    ) -> Result<()>;
    async fn update_host(&self, h: &Host) -> Result<()>;
    async fn list_hosts(&self) -> Result<Vec<Host>>;
    async fn get_host(&self, key: &str) -> Result<Host>;
    /// Deletes the host and revokes its tokens. The caller has checked
    /// that no VM is placed on it (the store has no index of VMs by host;
    /// the control plane checks its in-memory index and placement engine).
    async fn delete_host(&self, id: &str) -> Result<()>;

    // images
    async fn create_image(&self, i: &Image) -> Result<()>;
    async fn list_images(&self) -> Result<Vec<Image>>;
    async fn get_image(&self, key: &str) -> Result<Image>;
    /// Refused while VMs that are not deleted use it.
    async fn delete_image(&self, id: &str) -> Result<()>;
    /// Replaces the image's record (its name and content stay).
    async fn update_image(&self, i: &Image) -> Result<()>;

    // VMs
    /// Creates the VM with its first events (e.g. created, then scheduled
    /// when it was placed at once), in one transaction.
    async fn create_vm(&self, vm: &Vm, events: &[&str]) -> Result<()>;
    /// Replaces the VM; appends an event when `event` is given (atomically).
    async fn update_vm(&self, vm: &Vm, event: Option<&str>) -> Result<()>;
    async fn get_vm(&self, key: &str) -> Result<Vm>;
    async fn list_vms(&self, f: &VmFilter) -> Result<Vec<Vm>>;
    async fn vm_events(&self, vm_id: &str) -> Result<Vec<VmEvent>>;

    // migrations
    /// Creates the migration and stores the VM (which names it) in one
    /// transaction; refused while another migration of the VM is active.
    async fn create_migration(&self, m: &Migration, vm: &Vm, event: &str) -> Result<()>;
    /// Replaces the migration, and the VM with it when given (atomically),
    /// appending `event` to the VM's events.
    async fn update_migration(
        &self,
        m: &Migration,
        vm: Option<&Vm>,
        event: Option<&str>,
    ) -> Result<()>;
    async fn get_migration(&self, id: &str) -> Result<Migration>;
    /// Oldest first; of one VM when `vm_id` is given; only unfinished ones
    /// when `active`.
    async fn list_migrations(&self, vm_id: Option<&str>, active: bool) -> Result<Vec<Migration>>;

    // exports
    async fn put_export(&self, e: &VmExport) -> Result<()>;
    async fn get_export(&self, id: &str) -> Result<VmExport>;

    // tokens
    async fn create_token(&self, t: &TokenRecord) -> Result<()>;
    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;
    async fn count_tokens(&self, kind: TokenKind) -> Result<usize>;
    /// Every token of a kind, oldest first.
    async fn list_tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>>;
    /// Deletes the token `id` if it is of `kind`; whether it existed.
    async fn delete_token(&self, kind: TokenKind, id: &str) -> Result<bool>;
    /// Deletes the join tokens that can admit no host any more: used up,
    /// or expired before `now`. Returns how many went.
    async fn purge_join_tokens(&self, now: DateTime<Utc>) -> Result<usize>;
    /// Replaces every token of `t.kind` with `t`, in one transaction (the
    /// admin token's rotation: the old one stops working at the commit).
    async fn replace_tokens(&self, t: &TokenRecord) -> Result<()>;

    // the audit log and the residency trail
    /// Appends a record (its `seq` is ignored) durably; returns the
    /// sequence number it got. There is no update: records are never
    /// changed.
    async fn append_audit(&self, r: &AuditRecord) -> Result<u64>;
    /// Oldest first, at most `f.limit`.
    async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>>;
    /// Retention: deletes the records older than `before` (the operator's
    /// `--audit-retention-days`; nothing else deletes). How many went.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<usize>;
    /// The VM's residency trail, oldest first (written by the VM, migration
    /// and export writes themselves; kept after the VM is deleted).
    async fn vm_residency(&self, vm_id: &str) -> Result<Vec<ResidencyInterval>>;
    /// Every interval of every VM that overlaps `[from, to)`, by VM and seq.
    async fn residency_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ResidencyInterval>>;

    // documents: resources kept whole as JSON under a kind, with a unique
    // name per kind (catalogs, appliances, apps)
    /// Creates the document, or replaces the one with this id; a different
    /// document of the same kind and name is a conflict.
    async fn put_doc(&self, kind: &str, id: &str, name: &str, body: &str) -> Result<()>;
    /// The body, by id or name.
    async fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>>;
    /// All bodies of a kind, by name.
    async fn list_docs(&self, kind: &str) -> Result<Vec<String>>;
    /// Whether it existed.
    async fn delete_doc(&self, kind: &str, id: &str) -> Result<bool>;
}
