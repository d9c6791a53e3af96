//! Rebalancing: the placement engine plans moves towards a goal (even
//! load, lower carbon) that keep every VM's rules; on `execute` each move
//! becomes a migration workflow of its own (see `migration`), and a move
//! the workflow refuses is named with why.

use virt8ra_api::{MigrationCreate, Rebalance, RebalanceGoal, RebalanceMove, RebalanceRequest};

use crate::error::{ApiError, ApiResult};
use crate::state::Ctx;
use crate::workflows::migration;

/// Plans a rebalance, and starts its migrations when `req.execute`.
pub async fn run(app: &Ctx, req: RebalanceRequest) -> ApiResult<Rebalance> {
    use virt8ra_placement::rebalance::Goal;
    let frac = |v: Option<f64>, default: f64, what: &str| -> ApiResult<f64> {
        let v = v.unwrap_or(default);
        if !(0.0..=1.0).contains(&v) || v.is_nan() {
            return Err(ApiError::Invalid(format!("{what} {v} is outside 0..1")));
        }
        Ok(v)
    };
    let goal = match req.goal {
        RebalanceGoal::EvenLoad => Goal::EvenLoad {
            tolerance: frac(req.tolerance, 0.1, "tolerance")?,
        },
        RebalanceGoal::LowerCarbon => Goal::LowerCarbon {
            min_gain: frac(req.min_gain, 0.2, "min_gain")?,
        },
    };
    let plan = app
        .placement
        .with_engine(app, |e| e.plan_rebalance(&goal))
        .await?;
    let mut out = Rebalance::default();
    for m in plan.moves {
        // Capacity held for migrations under way is not a VM to move.
        if crate::registry::placement::is_reservation(&m.vm) {
            continue;
        }
        let name = app.vm(&m.vm).map(|v| v.name).unwrap_or(m.vm.clone());
        out.moves.push(RebalanceMove {
            vm: name,
            from: m.from,
            to: m.to,
            reason: m.reason,
        });
    }
    for (vm, why) in plan.stuck {
        let name = app.vm(&vm).map(|v| v.name).unwrap_or(vm);
        out.stuck.insert(name, why);
    }
    if req.execute {
        for mv in &out.moves {
            let r = MigrationCreate {
                to_host: Some(mv.to.clone()),
                mode: req.mode,
                ..Default::default()
            };
            match migration::start(app, &mv.vm, &r, &[]).await {
                Ok(m) => out.migrations.push(m),
                Err(e) => {
                    out.refused.insert(mv.vm.clone(), e.to_string());
                }
            }
        }
    }
    Ok(out)
}
