//! Tenancy records in the metadata store, as JSON under `/admin/`.

use magnetar_metadata::{MetaClient, MetaError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, TenancyError};
use crate::names::{validate_segment, NamespaceName};
use crate::policies::{ClusterData, Policies, TenantInfo, REDACTED};

pub const DEFAULT_TENANT: &str = "public";
pub const DEFAULT_NAMESPACE: &str = "default";

const CLUSTERS: &str = "/admin/clusters/";
const TENANTS: &str = "/admin/tenants/";
const POLICIES: &str = "/admin/policies/";
/// The last `geoId` given to a registered cluster.
const GEO_IDS: &str = "/geo/cluster-ids";
/// `geoId`s of streams routed in from another cluster (see
/// [`TenancyStore::stream_geo_id`]), by stream.
const GEO_STREAM_IDS: &str = "/geo/stream-ids/";
/// Compare-and-set attempts before an update gives up with `Conflict`.
const CAS_ATTEMPTS: usize = 16;

#[derive(Clone)]
pub struct TenancyStore {
    meta: MetaClient,
}

fn tenant_key(t: &str) -> String {
    format!("{TENANTS}{t}")
}

fn policies_key(ns: &NamespaceName) -> String {
    format!("{POLICIES}{ns}")
}

fn cluster_key(c: &str) -> String {
    format!("{CLUSTERS}{c}")
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty object would
    // still be readable if it ever did.
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

impl TenancyStore {
    pub fn new(meta: MetaClient) -> Self {
        TenancyStore { meta }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        let Some(kv) = self.meta.get(key).await? else {
            return Ok(None);
        };
        let v = serde_json::from_slice(&kv.value).map_err(|e| TenancyError::Corrupt {
            key: key.into(),
            reason: e.to_string(),
        })?;
        Ok(Some((v, kv.version)))
    }

    async fn create<T: Serialize>(&self, key: &str, what: String, v: &T) -> Result<()> {
        match self.meta.create(key, to_json(v)).await {
            Ok(_) => Ok(()),
            Err(MetaError::Conflict { .. }) => Err(TenancyError::AlreadyExists(what)),
            Err(e) => Err(e.into()),
        }
    }

    /// Read-modify-write with compare-and-set, retried on races.
    async fn modify<T, F>(&self, key: &str, what: impl Fn() -> String, mut f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut T) -> Result<()>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut v, version)) = self.read::<T>(key).await? else {
                return Err(TenancyError::NotFound(what()));
            };
            f(&mut v)?;
            match self.meta.compare_and_put(key, version, to_json(&v)).await {
                Ok(_) => return Ok(v),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(TenancyError::Conflict(what()))
    }

    async fn names_under(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .meta
            .list_keys(prefix)
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .filter(|rest| !rest.contains('/'))
            .collect())
    }

    // ---- clusters ----

    /// Registers a cluster and gives it the next `geoId`.
    pub async fn create_cluster(&self, name: &str, data: &ClusterData) -> Result<()> {
        validate_segment("cluster", name)?;
        data.validate()?;
        if self.meta.get(&cluster_key(name)).await?.is_some() {
            return Err(TenancyError::AlreadyExists(format!("cluster {name}")));
        }
        let data = ClusterData {
            geo_id: Some(self.next_geo_id().await?),
            ..data.clone()
        };
        self.create(&cluster_key(name), format!("cluster {name}"), &data)
            .await
    }

    /// The `geoId` of a stream other than a cluster (a life of an
    /// exchange's capture topic routed in here), given once from the same
    /// counter as clusters' so that no watermark is shared by two sources.
    pub async fn stream_geo_id(&self, stream: &str) -> Result<u16> {
        let key = format!("{GEO_STREAM_IDS}{stream}");
        if let Some((id, _)) = self.read::<u16>(&key).await? {
            return Ok(id);
        }
        let id = self.next_geo_id().await?;
        match self.meta.create(&key, to_json(&id)).await {
            Ok(_) => Ok(id),
            // Another broker gave it one first; that one holds.
            Err(MetaError::Conflict { .. }) => self
                .read::<u16>(&key)
                .await?
                .map(|(id, _)| id)
                .ok_or_else(|| TenancyError::Conflict(format!("the geoId of {stream}"))),
            Err(e) => Err(e.into()),
        }
    }

    /// A number never given before: a counter moved by compare-and-set.
    /// One lost to a failed registration is simply skipped.
    async fn next_geo_id(&self) -> Result<u16> {
        for _ in 0..CAS_ATTEMPTS {
            let (last, version) = match self.read::<u16>(GEO_IDS).await? {
                Some((n, v)) => (n, Some(v)),
                None => (0, None),
            };
            let next = last
                .checked_add(1)
                .ok_or_else(|| TenancyError::InvalidPolicy("every geoId is taken".into()))?;
            let stored = match version {
                Some(v) => self.meta.compare_and_put(GEO_IDS, v, to_json(&next)).await,
                None => self.meta.create(GEO_IDS, to_json(&next)).await,
            };
            match stored {
                Ok(_) => return Ok(next),
                Err(MetaError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(TenancyError::Conflict("the geoId counter".into()))
    }

    pub async fn get_cluster(&self, name: &str) -> Result<ClusterData> {
        validate_segment("cluster", name)?;
        self.read(&cluster_key(name))
            .await?
            .map(|(c, _)| c)
            .ok_or_else(|| TenancyError::NotFound(format!("cluster {name}")))
    }

    /// Replaces a cluster's record, as Pulsar's update does. Its `geoId`
    /// stays, and parameters given back as read ([`REDACTED`]) keep their
    /// stored value.
    pub async fn update_cluster(&self, name: &str, data: ClusterData) -> Result<()> {
        validate_segment("cluster", name)?;
        data.validate()?;
        self.modify(
            &cluster_key(name),
            || format!("cluster {name}"),
            |c: &mut ClusterData| {
                let mut new = data.clone();
                new.geo_id = c.geo_id;
                if new.authentication_parameters.as_deref() == Some(REDACTED) {
                    new.authentication_parameters = c.authentication_parameters.clone();
                }
                *c = new;
                Ok(())
            },
        )
        .await
        .map(drop)
    }

    /// Checks the clusters a namespace of `tenant` replicates to: each
    /// registered, and allowed to the tenant.
    pub async fn check_replication_clusters<'a>(
        &self,
        tenant: &str,
        clusters: impl IntoIterator<Item = &'a String>,
    ) -> Result<()> {
        let known = self.list_clusters().await?;
        let info = self.get_tenant(tenant).await?;
        for c in clusters {
            if !known.contains(c) {
                return Err(TenancyError::UnknownCluster(c.clone()));
            }
            if !info.allowed_clusters.contains(c) {
                return Err(TenancyError::ClusterNotAllowed {
                    cluster: c.clone(),
                    tenant: tenant.to_string(),
                });
            }
        }
        Ok(())
    }

    pub async fn list_clusters(&self) -> Result<Vec<String>> {
        self.names_under(CLUSTERS).await
    }

    /// Refuses while a tenant allows the cluster or a namespace replicates
    /// to it.
    pub async fn delete_cluster(&self, name: &str) -> Result<()> {
        validate_segment("cluster", name)?;
        for t in self.list_tenants().await? {
            if let Ok(info) = self.get_tenant(&t).await {
                if info.allowed_clusters.contains(name) {
                    return Err(TenancyError::NotEmpty(format!(
                        "cluster {name} (tenant {t} uses it)"
                    )));
                }
            }
            for ns in self.list_namespaces(&t).await.unwrap_or_default() {
                if let Ok(p) = self.get_policies(&ns).await {
                    if p.replication_clusters.contains(name) {
                        return Err(TenancyError::NotEmpty(format!(
                            "cluster {name} (namespace {ns} replicates to it)"
                        )));
                    }
                }
            }
        }
        match self.meta.delete(&cluster_key(name)).await? {
            Some(_) => Ok(()),
            None => Err(TenancyError::NotFound(format!("cluster {name}"))),
        }
    }

    // ---- tenants ----

    async fn check_clusters(&self, info: &TenantInfo) -> Result<()> {
        let known = self.list_clusters().await?;
        match info.allowed_clusters.iter().find(|c| !known.contains(c)) {
            Some(c) => Err(TenancyError::InvalidPolicy(format!(
                "cluster {c} does not exist"
            ))),
            None => Ok(()),
        }
    }

    pub async fn create_tenant(&self, name: &str, info: &TenantInfo) -> Result<()> {
        validate_segment("tenant", name)?;
        self.check_clusters(info).await?;
        self.create(&tenant_key(name), format!("tenant {name}"), info)
            .await
    }

    pub async fn get_tenant(&self, name: &str) -> Result<TenantInfo> {
        validate_segment("tenant", name)?;
        self.read(&tenant_key(name))
            .await?
            .map(|(t, _)| t)
            .ok_or_else(|| TenancyError::NotFound(format!("tenant {name}")))
    }

    pub async fn update_tenant(&self, name: &str, info: TenantInfo) -> Result<()> {
        validate_segment("tenant", name)?;
        self.check_clusters(&info).await?;
        self.modify(
            &tenant_key(name),
            || format!("tenant {name}"),
            |t: &mut TenantInfo| {
                *t = info.clone();
                Ok(())
            },
        )
        .await
        .map(drop)
    }

    pub async fn list_tenants(&self) -> Result<Vec<String>> {
        self.names_under(TENANTS).await
    }

    /// Refuses while the tenant has namespaces, as Pulsar does.
    pub async fn delete_tenant(&self, name: &str) -> Result<()> {
        self.get_tenant(name).await?;
        if !self.list_namespaces(name).await?.is_empty() {
            return Err(TenancyError::NotEmpty(format!("tenant {name}")));
        }
        match self.meta.delete(&tenant_key(name)).await? {
            Some(_) => Ok(()),
            None => Err(TenancyError::NotFound(format!("tenant {name}"))),
        }
    }

    // ---- namespaces ----

    pub async fn create_namespace(&self, ns: &NamespaceName, policies: &Policies) -> Result<()> {
        policies.validate()?;
        self.get_tenant(ns.tenant()).await?;
        self.create(&policies_key(ns), format!("namespace {ns}"), policies)
            .await
    }

    pub async fn get_policies(&self, ns: &NamespaceName) -> Result<Policies> {
        self.read(&policies_key(ns))
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| TenancyError::NotFound(format!("namespace {ns}")))
    }

    /// Applies `f` with compare-and-set; the result must still validate.
    pub async fn modify_policies<F>(&self, ns: &NamespaceName, mut f: F) -> Result<Policies>
    where
        F: FnMut(&mut Policies) -> Result<()>,
    {
        self.modify(
            &policies_key(ns),
            || format!("namespace {ns}"),
            |p: &mut Policies| {
                f(p)?;
                p.validate()
            },
        )
        .await
    }

    /// Lists the namespaces of a tenant, which must exist.
    pub async fn list_namespaces(&self, tenant: &str) -> Result<Vec<NamespaceName>> {
        validate_segment("tenant", tenant)?;
        let names = self.names_under(&format!("{POLICIES}{tenant}/")).await?;
        names
            .iter()
            .map(|n| NamespaceName::new(tenant, n))
            .collect()
    }

    pub async fn namespace_exists(&self, ns: &NamespaceName) -> Result<bool> {
        Ok(self.meta.get(&policies_key(ns)).await?.is_some())
    }

    /// Removes the namespace record only; the broker removes topics first.
    pub async fn delete_namespace(&self, ns: &NamespaceName) -> Result<()> {
        match self.meta.delete(&policies_key(ns)).await? {
            Some(_) => Ok(()),
            None => Err(TenancyError::NotFound(format!("namespace {ns}"))),
        }
    }

    /// Creates the cluster, the `public` tenant and `public/default` if any
    /// is missing, so that a fresh installation is usable at once.
    pub async fn ensure_defaults(&self, cluster: &str, data: &ClusterData) -> Result<()> {
        match self.create_cluster(cluster, data).await {
            Ok(()) | Err(TenancyError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let tenant = TenantInfo {
            admin_roles: Default::default(),
            allowed_clusters: [cluster.to_string()].into(),
        };
        match self.create_tenant(DEFAULT_TENANT, &tenant).await {
            Ok(()) | Err(TenancyError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let policies = Policies {
            replication_clusters: [cluster.to_string()].into(),
            ..Policies::default()
        };
        match self
            .create_namespace(&NamespaceName::default_namespace(), &policies)
            .await
        {
            Ok(()) | Err(TenancyError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
