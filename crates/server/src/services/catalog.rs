//! The marketplace: appliances published in this control plane's signed
//! catalog, remote catalogs trusted by their public key, and the lookup of
//! an appliance (`catalog/key`) with its images imported and verified.
//! The handlers are in [`crate::http::catalog`].

use std::collections::BTreeMap;

use chrono::Utc;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use virt8ra_api::{
    version_cmp, Appliance, Catalog, CatalogCreate, CatalogEntry, CatalogIndex, SignedCatalog,
};

use crate::error::{missing_ref, ApiError, ApiResult, Kind};
use crate::state::Ctx;

pub const APPLIANCE: &str = "appliance";
pub const CATALOG: &str = "catalog";
/// The name of this control plane's own catalog in listings.
pub const LOCAL: &str = "local";

/// The control plane's catalog signing key: `DATA_DIR/catalog.key`, loaded
/// or made once at start-up (see [`crate::keys`]).
pub fn signing_key(app: &Ctx) -> SigningKey {
    app.catalog_key.clone()
}

pub fn parse_public_key(hex_key: &str) -> ApiResult<VerifyingKey> {
    let bytes = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "invalid public key {hex_key:?}: an ed25519 public key is 64 hex digits"
            ))
        })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| ApiError::Invalid(format!("invalid ed25519 public key: {e}")))
}

pub async fn local_appliances(app: &Ctx) -> ApiResult<Vec<Appliance>> {
    let mut out = Vec::new();
    for body in app.store.list_docs(APPLIANCE).await? {
        out.push(
            serde_json::from_str(&body)
                .map_err(|e| ApiError::Internal(format!("corrupt appliance record: {e}")))?,
        );
    }
    Ok(out)
}

pub async fn catalogs(app: &Ctx) -> ApiResult<Vec<Catalog>> {
    let mut out = Vec::new();
    for body in app.store.list_docs(CATALOG).await? {
        out.push(
            serde_json::from_str(&body)
                .map_err(|e| ApiError::Internal(format!("corrupt catalog record: {e}")))?,
        );
    }
    Ok(out)
}

/// Finds an appliance by `[CATALOG/]NAME[@VERSION]` (newest version if none).
pub async fn resolve(app: &Ctx, key: &str) -> ApiResult<(CatalogEntry, Option<Catalog>)> {
    let (cat, rest) = match key.split_once('/') {
        Some((c, r)) => (Some(c), r),
        None => (None, key),
    };
    let (name, version) = match rest.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    let mut found: Vec<(CatalogEntry, Option<Catalog>)> = Vec::new();
    if cat.is_none() || cat == Some(LOCAL) {
        for a in local_appliances(app).await? {
            found.push((
                CatalogEntry {
                    catalog: LOCAL.into(),
                    appliance: a,
                },
                None,
            ));
        }
    }
    for c in catalogs(app).await? {
        if cat.is_some_and(|x| x != c.name) {
            continue;
        }
        for a in &c.appliances {
            found.push((
                CatalogEntry {
                    catalog: c.name.clone(),
                    appliance: a.clone(),
                },
                Some(c.clone()),
            ));
        }
    }
    found.retain(|(e, _)| {
        e.appliance.name == name && version.is_none_or(|v| e.appliance.version == v)
    });
    // The local catalog wins over remote ones; then the newest version.
    found.sort_by(|(a, _), (b, _)| {
        (b.catalog == LOCAL)
            .cmp(&(a.catalog == LOCAL))
            .then_with(|| version_cmp(&b.appliance.version, &a.appliance.version))
    });
    found.into_iter().next().ok_or_else(|| ApiError::BadRef {
        field: None,
        kind: Kind::Appliance,
        name: key.to_string(),
    })
}

/// The signed index of this control plane's appliances.
pub async fn signed_index(app: &Ctx) -> ApiResult<SignedCatalog> {
    let key = signing_key(app);
    let mut appliances = local_appliances(app).await?;
    for a in &mut appliances {
        for i in &mut a.images {
            i.url = Some(format!("catalog/images/{}", i.sha256));
        }
    }
    let index = CatalogIndex {
        publisher: "virt8ra".into(),
        generated_at: Utc::now(),
        appliances,
    };
    let payload = serde_json::to_string(&index).map_err(|e| ApiError::Internal(e.to_string()))?;
    let sig = key.sign(payload.as_bytes());
    Ok(SignedCatalog {
        payload,
        signature: hex::encode(sig.to_bytes()),
        public_key: hex::encode(key.verifying_key().to_bytes()),
    })
}

/// Fetches a catalog and verifies it with the trusted key.
pub async fn fetch_verified(
    trust: &virt8ra_tls::Trust,
    url: &str,
    public_key: &str,
) -> ApiResult<Vec<Appliance>> {
    let key = parse_public_key(public_key)?;
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::Invalid(format!("invalid catalog URL {url:?}: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(ApiError::Invalid(format!(
            "invalid catalog URL {url:?}: only http and https"
        )));
    }
    let client = trust
        .http()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let resp = client.get(url).send().await.map_err(|e| {
        ApiError::Invalid(format!(
            "cannot fetch catalog {url}: {}",
            trust.describe(&e, url)
        ))
    })?;
    if !resp.status().is_success() {
        return Err(ApiError::Invalid(format!(
            "catalog {url} answered {}",
            resp.status()
        )));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ApiError::Invalid(format!("cannot read catalog {url}: {e}")))?;
    let signed: SignedCatalog = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Invalid(format!(
            "catalog {url} is not a signed catalog index (payload, signature): {e}"
        ))
    })?;
    let sig = hex::decode(signed.signature.trim())
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "catalog {url}: the signature is not 128 hex digits; the catalog was refused"
            ))
        })?;
    key.verify(signed.payload.as_bytes(), &sig).map_err(|_| {
        ApiError::Invalid(format!(
            "catalog {url}: the signature does not verify with the trusted key {public_key}; \
             the catalog was refused (it was changed after signing, or signed by another key)"
        ))
    })?;
    let index: CatalogIndex = serde_json::from_str(&signed.payload).map_err(|e| {
        ApiError::Invalid(format!("catalog {url}: the signed index is malformed: {e}"))
    })?;
    for a in &index.appliances {
        a.validate()
            .map_err(|e| ApiError::Invalid(format!("catalog {url}: {e}")))?;
        for i in &a.images {
            if !crate::services::images::valid_sha(&i.sha256) || i.url.is_none() {
                return Err(ApiError::Invalid(format!(
                    "catalog {url}: appliance {} names image {} without a sha256 and URL",
                    a.key(),
                    i.name
                )));
            }
        }
    }
    Ok(index.appliances)
}

pub async fn get_catalog(app: &Ctx, name: &str) -> ApiResult<Catalog> {
    let body = app
        .store
        .get_doc(CATALOG, name)
        .await?
        .ok_or_else(|| ApiError::not_found(Kind::Catalog, name))?;
    serde_json::from_str(&body).map_err(|e| ApiError::Internal(format!("corrupt catalog: {e}")))
}

/// The image ids (in this store) an appliance's images have, importing
/// those of a remote catalog first (verified against the signed sha256).
pub async fn ensure_images(
    app: &Ctx,
    entry: &CatalogEntry,
    catalog: Option<&Catalog>,
) -> ApiResult<Vec<String>> {
    let stored = app.store.list_images().await?;
    let by_sha: BTreeMap<&str, &virt8ra_api::Image> =
        stored.iter().map(|i| (i.sha256.as_str(), i)).collect();
    let mut ids = Vec::new();
    for img in &entry.appliance.images {
        if let Some(i) = by_sha.get(img.sha256.as_str()) {
            ids.push(i.id.clone());
            continue;
        }
        let Some(c) = catalog else {
            return Err(ApiError::Invalid(format!(
                "image {} ({}) of appliance {} is no longer in the image store",
                img.name,
                img.sha256,
                entry.appliance.key()
            )));
        };
        let rel = img.url.clone().unwrap_or_default();
        let url = reqwest::Url::parse(&c.url)
            .and_then(|base| base.join(&rel))
            .map_err(|e| {
                ApiError::Invalid(format!("catalog {}: bad image URL {rel:?}: {e}", c.name))
            })?;
        let mut name = img.name.clone();
        if stored.iter().any(|i| i.name == name) {
            name = format!("{}-{}", img.name, &img.sha256[..8]);
        }
        let i = crate::services::images::import_from_url(
            app,
            url.as_str(),
            Some(&img.sha256),
            crate::services::images::Meta {
                id: uuid::Uuid::new_v4().to_string(),
                name,
                arch: img.arch.clone(),
                version: Some(entry.appliance.version.clone()),
                provenance: format!("catalog {}: {url}", c.name),
                source_sha256: None,
                labels: Default::default(),
                // A catalog's images are public, like the catalog.
                project: None,
            },
        )
        .await
        .map_err(|e| match e {
            ApiError::Invalid(m) => ApiError::Invalid(format!(
                "appliance {} from catalog {}: {m}",
                entry.appliance.key(),
                c.name
            )),
            other => other,
        })?;
        if i.sha256 != img.sha256 {
            // A non-qcow2 source was converted: the stored file is not what
            // the catalog signed.
            let _ = app.store.delete_image(&i.id).await;
            let others = app.store.list_images().await?;
            if !others.iter().any(|o| o.sha256 == i.sha256) {
                let file = app.images_dir.join(format!("{}.qcow2", i.sha256));
                let _ = tokio::fs::remove_file(file).await;
            }
            return Err(ApiError::Invalid(format!(
                "catalog {}: image {} is not a qcow2 file with the signed content",
                c.name, img.name
            )));
        }
        ids.push(i.id);
    }
    Ok(ids)
}

/// Publishes appliance `a` in this control plane's catalog. Its images
/// must be in the image store (a missing one is a 400); their sha256,
/// size and arch are filled in.
pub async fn publish(app: &Ctx, mut a: Appliance) -> ApiResult<Appliance> {
    a.validate().map_err(ApiError::Invalid)?;
    for img in &mut a.images {
        let i = app.store.get_image(&img.name).await;
        let i = i.map_err(missing_ref)?;
        if !img.sha256.is_empty() && img.sha256 != i.sha256 {
            return Err(ApiError::Invalid(format!(
                "image {}: the definition names sha256 {}, the image store has {}",
                img.name, img.sha256, i.sha256
            )));
        }
        img.sha256 = i.sha256;
        img.size_bytes = i.size_bytes;
        img.arch = i.arch;
        img.url = None;
    }
    let key = a.key();
    if app.store.get_doc(APPLIANCE, &key).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "appliance {key} is already published; publish a new version"
        )));
    }
    let body = serde_json::to_string(&a).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(APPLIANCE, &key, &key, &body).await?;
    Ok(a)
}

/// Every appliance this control plane can deploy: its own and those of the
/// catalogs it trusts.
pub async fn entries(app: &Ctx) -> ApiResult<Vec<CatalogEntry>> {
    let mut out: Vec<CatalogEntry> = local_appliances(app)
        .await?
        .into_iter()
        .map(|a| CatalogEntry {
            catalog: LOCAL.into(),
            appliance: a,
        })
        .collect();
    for c in catalogs(app).await? {
        for a in c.appliances {
            out.push(CatalogEntry {
                catalog: c.name.clone(),
                appliance: a,
            });
        }
    }
    Ok(out)
}

/// Appliance `key` (`[CATALOG/]NAME[@VERSION]`), as the path names it:
/// not there is a 404.
pub async fn entry(app: &Ctx, key: &str) -> ApiResult<CatalogEntry> {
    match resolve(app, key).await {
        Ok((e, _)) => Ok(e),
        Err(ApiError::BadRef { kind, name, .. }) => Err(ApiError::NotFound {
            kind,
            name,
            hint: Some("; `virt8ra appliance list` shows what exists"),
        }),
        Err(ApiError::Invalid(m)) => Err(ApiError::Missing(m)),
        Err(e) => Err(e),
    }
}

/// Takes local appliance `key` (`NAME@VERSION`) out of the catalog.
pub async fn unpublish(app: &Ctx, key: &str) -> ApiResult<()> {
    if app.store.delete_doc(APPLIANCE, key).await? {
        Ok(())
    } else {
        Err(ApiError::Missing(format!(
            "appliance '{key}' is not published here (name it as NAME@VERSION)"
        )))
    }
}

/// The stored image of a published appliance by its sha256: what the
/// public catalog serves (nothing else).
pub async fn published_image(app: &Ctx, sha: &str) -> ApiResult<virt8ra_api::Image> {
    let published = local_appliances(app)
        .await?
        .iter()
        .any(|a| a.images.iter().any(|i| i.sha256 == sha));
    if !published {
        return Err(ApiError::Missing(format!(
            "no published appliance has image {sha}"
        )));
    }
    app.store
        .list_images()
        .await?
        .into_iter()
        .find(|i| i.sha256 == sha)
        .ok_or_else(|| ApiError::Missing(format!("image {sha} is no longer stored")))
}

/// Adds another provider's catalog, trusted with the given key. It is
/// fetched and verified now; a catalog that does not verify is refused.
pub async fn add(app: &Ctx, req: CatalogCreate) -> ApiResult<Catalog> {
    virt8ra_api::validate::name("catalog", &req.name).map_err(ApiError::Invalid)?;
    if req.name == LOCAL {
        return Err(ApiError::Invalid(format!(
            "'{LOCAL}' names this control plane's own catalog"
        )));
    }
    if app.store.get_doc(CATALOG, &req.name).await?.is_some() {
        return Err(ApiError::Conflict(format!(
            "catalog '{}' already exists",
            req.name
        )));
    }
    let appliances = fetch_verified(&app.trust, &req.url, &req.public_key).await?;
    let c = Catalog {
        name: req.name,
        url: req.url,
        public_key: req.public_key.trim().to_lowercase(),
        appliances,
        fetched_at: Utc::now(),
    };
    let body = serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(CATALOG, &c.name, &c.name, &body).await?;
    Ok(c)
}

/// Fetches catalog `name` again; on a verification failure the last
/// verified copy stays.
pub async fn refresh(app: &Ctx, name: &str) -> ApiResult<Catalog> {
    let mut c = get_catalog(app, name).await?;
    c.appliances = fetch_verified(&app.trust, &c.url, &c.public_key).await?;
    c.fetched_at = Utc::now();
    let body = serde_json::to_string(&c).map_err(|e| ApiError::Internal(e.to_string()))?;
    app.store.put_doc(CATALOG, &c.name, &c.name, &body).await?;
    Ok(c)
}

/// Removes catalog `name`.
pub async fn remove(app: &Ctx, name: &str) -> ApiResult<()> {
    let c = get_catalog(app, name).await?;
    app.store.delete_doc(CATALOG, &c.name).await?;
    Ok(())
}
