//! The kinds of resource `apply` manages, each an implementation of
//! [`Kind`]: list, create, update and delete through the API.

use super::*;

// ---------------------------------------------------------------- the kinds

pub(crate) struct Providers;

impl Kind for Providers {
    const KIND: &'static str = "provider";
    const SECTION: &'static str = "providers";
    const IMMUTABLE: &'static [&'static str] = &[];
    const REPLACE: bool = false;
    type Decl = ProviderCreate;
    type Live = Provider;

    fn name(d: &ProviderCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Provider) -> &str {
        &l.name
    }
    fn live_labels(l: &Provider) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &ProviderCreate) -> Value {
        json!({"country": d.country, "jurisdiction": d.jurisdiction, "labels": d.labels})
    }
    fn live_view(l: &Provider) -> Value {
        json!({"country": l.country, "jurisdiction": l.jurisdiction, "labels": user_labels(&l.labels)})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Provider>> {
        Ok(c.get::<Page<Provider>>("/providers").await?.items)
    }
    async fn create(c: &Client, d: &ProviderCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Provider>("/providers", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &ProviderCreate, l: &Provider) -> anyhow::Result<()> {
        let body = ProviderUpdate {
            country: Some(d.country.clone()),
            jurisdiction: Some(d.jurisdiction.clone()),
            labels: Some(keep_marker(&d.labels, &l.labels)),
        };
        c.request::<Provider>(
            Method::PATCH,
            &format!("/providers/{}", seg(&l.id)),
            Some(&body),
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Provider, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/providers/{}", seg(&l.id)))
            .await
            .map(drop)
    }
}

pub(crate) struct Sites;

impl Kind for Sites {
    const KIND: &'static str = "site";
    const SECTION: &'static str = "sites";
    const IMMUTABLE: &'static [&'static str] = &["provider", "country"];
    const REPLACE: bool = false;
    type Decl = SiteCreate;
    type Live = Site;

    fn name(d: &SiteCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Site) -> &str {
        &l.name
    }
    fn live_labels(l: &Site) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &SiteCreate) -> Value {
        json!({"provider": d.provider, "country": d.country, "city": d.city,
               "latitude": d.latitude, "longitude": d.longitude, "tier": d.tier,
               "facts": d.facts, "labels": d.labels, "trusted_fabric": d.trusted_fabric})
    }
    fn live_view(l: &Site) -> Value {
        json!({"provider": l.provider, "country": l.country, "city": l.city,
               "latitude": l.latitude, "longitude": l.longitude, "tier": l.tier,
               "facts": l.facts, "labels": user_labels(&l.labels),
               "trusted_fabric": l.trusted_fabric})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Site>> {
        Ok(c.get::<Page<Site>>("/sites").await?.items)
    }
    async fn create(c: &Client, d: &SiteCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Site>("/sites", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &SiteCreate, l: &Site) -> anyhow::Result<()> {
        let body = SiteUpdate {
            city: Some(d.city.clone()),
            latitude: Some(d.latitude),
            longitude: Some(d.longitude),
            tier: Some(d.tier),
            facts: Some(d.facts.clone()),
            labels: Some(keep_marker(&d.labels, &l.labels)),
            trusted_fabric: Some(d.trusted_fabric),
        };
        c.request::<Site>(
            Method::PATCH,
            &format!("/sites/{}", seg(&l.id)),
            Some(&body),
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Site, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/sites/{}", seg(&l.id))).await.map(drop)
    }
}

pub(crate) struct Images;

impl Kind for Images {
    const KIND: &'static str = "image";
    const SECTION: &'static str = "images";
    const IMMUTABLE: &'static [&'static str] = &["sha256", "arch"];
    const REPLACE: bool = true;
    type Decl = ImageDecl;
    type Live = Image;

    fn name(d: &ImageDecl) -> &str {
        &d.name
    }
    fn live_name(l: &Image) -> &str {
        &l.name
    }
    fn live_labels(l: &Image) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &ImageDecl) -> Value {
        json!({"sha256": d.sha256, "arch": d.arch})
    }
    fn live_view(l: &Image) -> Value {
        // The file's sha256 is that of the file as imported; the stored copy
        // differs when the import converted it.
        json!({"sha256": l.source_sha256.as_ref().unwrap_or(&l.sha256), "arch": l.arch})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Image>> {
        Ok(c.get::<Page<Image>>("/images").await?.items)
    }
    async fn create(c: &Client, d: &ImageDecl) -> anyhow::Result<()> {
        let Some(local) = &d.local else {
            bail!(
                "image {} from {} was not downloaded",
                d.name,
                d.url.as_deref().unwrap_or("-")
            );
        };
        let path = format!(
            "/images?name={}&arch={}&labels={}",
            seg(&d.name),
            seg(&d.arch),
            seg(&format!("{MANAGED_KEY}={MANAGED_VALUE}"))
        );
        c.upload::<Image>(&path, local).await.map(drop)
    }
    async fn update(_: &Client, d: &ImageDecl, _: &Image) -> anyhow::Result<()> {
        bail!("image {} has nothing that changes in place", d.name)
    }
    async fn delete(c: &Client, l: &Image, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/images/{}", seg(&l.id))).await.map(drop)
    }
}

pub(crate) struct Networks;

/// Networks carry no labels: nothing marks one as apply's, so `--prune`
/// never deletes a network.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The network a declaration makes, with the control plane's defaults
/// filled in (gateway: the subnet's first address; MTU 1390; NAT when there
/// is a gateway), so a second apply of the same file compares equal.
fn network_view(d: &NetworkCreate) -> Value {
    let cidr: Option<virt8ra_api::Ipv4Cidr> = d.cidr.trim().parse().ok();
    let gateway = match (d.no_gateway, d.gateway, cidr) {
        (true, ..) => None,
        (false, Some(g), _) => Some(g),
        (false, None, Some(c)) => Some(std::net::Ipv4Addr::from(u32::from(c.network()) + 1)),
        (false, None, None) => None,
    };
    json!({"cidr": cidr.map(|c| c.to_string()).unwrap_or_else(|| d.cidr.clone()),
           "gateway": gateway, "dns": d.dns,
           "mtu": d.mtu.unwrap_or(virt8ra_api::DEFAULT_MTU),
           "nat": d.nat.unwrap_or(gateway.is_some()), "span": d.span})
}

impl Kind for Networks {
    const KIND: &'static str = "network";
    const SECTION: &'static str = "networks";
    // Networks are immutable for now: any change is a plan error.
    const IMMUTABLE: &'static [&'static str] = &["cidr", "gateway", "dns", "mtu", "nat", "span"];
    const REPLACE: bool = false;
    type Decl = NetworkCreate;
    type Live = Network;

    fn name(d: &NetworkCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Network) -> &str {
        &l.name
    }
    fn live_labels(_: &Network) -> &BTreeMap<String, String> {
        &NO_LABELS
    }
    fn view(d: &NetworkCreate) -> Value {
        network_view(d)
    }
    fn live_view(l: &Network) -> Value {
        json!({"cidr": l.cidr, "gateway": l.gateway, "dns": l.dns, "mtu": l.mtu,
               "nat": l.nat, "span": l.span})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Network>> {
        Ok(c.get::<Page<Network>>("/networks").await?.items)
    }
    async fn create(c: &Client, d: &NetworkCreate) -> anyhow::Result<()> {
        c.post::<Network>("/networks", d).await.map(drop)
    }
    async fn update(_: &Client, d: &NetworkCreate, _: &Network) -> anyhow::Result<()> {
        bail!("network {} has nothing that changes in place", d.name)
    }
    async fn delete(c: &Client, l: &Network, _: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/networks/{}", seg(&l.id)))
            .await
            .map(drop)
    }
}

pub(crate) struct Vms;

impl Kind for Vms {
    const KIND: &'static str = "vm";
    const SECTION: &'static str = "vms";
    const IMMUTABLE: &'static [&'static str] = &[
        "vcpus",
        "memory_mib",
        "disk_gib",
        "image",
        "placement",
        "user_data",
        "ssh_authorized_keys",
        "network",
        "ports",
        "labels",
        "data_disks",
        "nics",
        "publish",
        "ingress",
    ];
    const REPLACE: bool = false;
    const REPLACE_ON_REQUEST: bool = true;
    type Decl = VmCreate;
    type Live = Vm;

    fn name(d: &VmCreate) -> &str {
        &d.name
    }
    fn live_name(l: &Vm) -> &str {
        &l.name
    }
    fn live_labels(l: &Vm) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &VmCreate) -> Value {
        json!({"vcpus": d.vcpus, "memory_mib": d.memory_mib, "disk_gib": d.disk_gib,
               "image": d.image, "placement": d.placement, "user_data": d.user_data,
               "ssh_authorized_keys": d.ssh_authorized_keys, "network": d.network,
               "ports": d.ports, "data_disks": d.data_disks, "nics": d.nics,
               "publish": d.publish, "ingress": d.ingress,
               "labels": d.labels, "start": d.start})
    }
    fn live_view(l: &Vm) -> Value {
        let s = &l.spec;
        json!({"vcpus": s.vcpus, "memory_mib": s.memory_mib, "disk_gib": s.disk_gib,
               "image": s.image, "placement": s.placement, "user_data": s.user_data,
               "ssh_authorized_keys": s.ssh_authorized_keys, "network": s.network,
               "ports": s.ports, "data_disks": s.data_disks, "nics": s.nics,
               "publish": s.publish, "ingress": s.ingress,
               "labels": user_labels(&l.labels), "start": l.power == PowerState::Running})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<Vm>> {
        let mut items: Vec<Vm> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cur) => format!("/vms?cursor={}", seg(cur)),
                None => "/vms".into(),
            };
            let page: Page<Vm> = c.get(&path).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        // A VM being deleted is on its way out: declaring its name again
        // has to wait until it is gone.
        Ok(items)
    }
    async fn create(c: &Client, d: &VmCreate) -> anyhow::Result<()> {
        let mut d = d.clone();
        d.labels = with_marker(&d.labels);
        c.post::<Vm>("/vms", &d).await.map(drop)
    }
    async fn update(c: &Client, d: &VmCreate, l: &Vm) -> anyhow::Result<()> {
        // Only the power state changes in place.
        let action = if d.start {
            VmAction::Start
        } else {
            VmAction::Stop
        };
        c.post::<Vm>(
            &format!("/vms/{}/actions", seg(&l.id)),
            &VmActionRequest {
                action,
                timeout_s: None,
            },
        )
        .await
        .map(drop)
    }
    async fn delete(c: &Client, l: &Vm, wait: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/vms/{}", seg(&l.id))).await?;
        // What the VM used (its image, its site) can go only once it is gone.
        let start = Instant::now();
        loop {
            let v: Vm = c.get(&format!("/vms/{}", seg(&l.id))).await?;
            if v.status.phase == VmPhase::Deleted {
                return Ok(());
            }
            if start.elapsed() > wait {
                bail!(
                    "VM {} is still {} after {} s",
                    l.name,
                    v.status.phase.as_str(),
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub(crate) struct Apps;

/// An app's locations as given, trimmed and sorted (their order does not
/// matter to a deployment).
pub(super) fn location_set<'a>(locs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = locs.map(|l| l.trim().to_string()).collect();
    v.sort();
    v
}

impl Kind for Apps {
    const KIND: &'static str = "app";
    const SECTION: &'static str = "apps";
    const IMMUTABLE: &'static [&'static str] = &[
        "appliance",
        "locations",
        "replicas_per_location",
        "params",
        "ssh_authorized_keys",
        "labels",
    ];
    const REPLACE: bool = false;
    const REPLACE_ON_REQUEST: bool = true;
    type Decl = AppDecl;
    type Live = App;

    fn name(d: &AppDecl) -> &str {
        &d.req.name
    }
    fn live_name(l: &App) -> &str {
        &l.name
    }
    fn live_labels(l: &App) -> &BTreeMap<String, String> {
        &l.labels
    }
    fn view(d: &AppDecl) -> Value {
        json!({"appliance": d.appliance,
               "locations": location_set(d.req.locations.iter().map(String::as_str)),
               "replicas_per_location": d.req.replicas_per_location,
               "params": d.params, "ssh_authorized_keys": d.req.ssh_authorized_keys,
               "labels": d.req.labels})
    }
    fn live_view(l: &App) -> Value {
        // Every location of a deployment has the same number of replicas.
        let replicas: Vec<u32> = l.locations.iter().map(|x| x.replicas).collect();
        let replicas = match replicas.as_slice() {
            [first, rest @ ..] if rest.iter().all(|r| r == first) => json!(first),
            _ => json!(replicas),
        };
        json!({"appliance": l.appliance,
               "locations": location_set(l.locations.iter().map(|x| x.location.as_str())),
               "replicas_per_location": replicas,
               "params": l.params, "ssh_authorized_keys": l.ssh_authorized_keys,
               "labels": user_labels(&l.labels)})
    }
    async fn list(c: &Client) -> anyhow::Result<Vec<App>> {
        c.get::<Vec<App>>("/apps").await
    }
    async fn create(c: &Client, d: &AppDecl) -> anyhow::Result<()> {
        // The appliance as planned (a version published meanwhile is not
        // picked up half-way).
        let mut req = d.req.clone();
        req.appliance = d.appliance.clone();
        req.locations = req.locations.iter().map(|l| l.trim().to_string()).collect();
        req.labels = with_marker(&req.labels);
        c.post::<App>("/apps", &req).await.map(drop)
    }
    async fn update(_: &Client, d: &AppDecl, _: &App) -> anyhow::Result<()> {
        bail!("app {} has nothing that changes in place", d.req.name)
    }
    async fn delete(c: &Client, l: &App, wait: Duration) -> anyhow::Result<()> {
        c.delete(&format!("/apps/{}", seg(&l.id))).await?;
        // The app is gone (and its name free) once every replica is.
        let start = Instant::now();
        loop {
            let Some(a) = c.get_opt::<App>(&format!("/apps/{}", seg(&l.id))).await? else {
                return Ok(());
            };
            if start.elapsed() > wait {
                bail!(
                    "app {} is still {} after {} s",
                    l.name,
                    a.status,
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}
