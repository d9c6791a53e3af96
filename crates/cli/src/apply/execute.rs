//! Executing a plan: creates and updates in dependency order, then
//! deletions in reverse.

use super::*;

/// Creates, updates and replaces of one kind, in file order.
/// How the plan is carried out.
pub(super) struct Exec<'a> {
    pub(super) c: &'a Client,
    /// How long a deleted VM may take to be gone.
    pub(super) wait: Duration,
    /// Report each change on stderr as it is made (table output).
    pub(super) progress: bool,
}

impl Exec<'_> {
    fn note(&self, action: Action, kind: &str, name: &str) {
        if self.progress {
            eprintln!("{} {kind} {name}", action.as_str());
        }
    }
}

pub(super) async fn exec_forward<K: Kind>(x: &Exec<'_>, steps: &[Step<K>]) -> anyhow::Result<()> {
    let (c, wait) = (x.c, x.wait);
    for s in steps {
        let what = || format!("{} {}", K::KIND, s.name);
        if matches!(s.action, Action::Create | Action::Update | Action::Replace) {
            x.note(s.action, K::KIND, &s.name);
        }
        match (s.action, &s.decl, &s.live) {
            (Action::Create, Some(d), _) => K::create(c, d)
                .await
                .with_context(|| format!("create {}", what()))?,
            (Action::Update, Some(d), Some(l)) => K::update(c, d, l)
                .await
                .with_context(|| format!("update {}", what()))?,
            (Action::Replace, Some(d), Some(l)) => {
                K::delete(c, l, wait)
                    .await
                    .with_context(|| format!("replace {}", what()))?;
                K::create(c, d)
                    .await
                    .with_context(|| format!("replace {}", what()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

pub(super) async fn exec_delete<K: Kind>(x: &Exec<'_>, steps: &[Step<K>]) -> anyhow::Result<()> {
    for s in steps {
        if let (Action::Delete, Some(l)) = (s.action, &s.live) {
            x.note(s.action, K::KIND, &s.name);
            K::delete(x.c, l, x.wait)
                .await
                .with_context(|| format!("delete {} {}", K::KIND, s.name))?;
        }
    }
    Ok(())
}

impl Plan {
    /// Creates and updates in dependency order, then deletions in reverse.
    pub(super) async fn execute(&self, x: &Exec<'_>) -> anyhow::Result<()> {
        exec_forward(x, &self.providers).await?;
        exec_forward(x, &self.sites).await?;
        exec_forward(x, &self.images).await?;
        exec_forward(x, &self.networks).await?;
        exec_forward(x, &self.vms).await?;
        exec_forward(x, &self.apps).await?;
        exec_delete(x, &self.apps).await?;
        exec_delete(x, &self.vms).await?;
        exec_delete(x, &self.networks).await?;
        exec_delete(x, &self.images).await?;
        exec_delete(x, &self.sites).await?;
        exec_delete(x, &self.providers).await
    }
}
