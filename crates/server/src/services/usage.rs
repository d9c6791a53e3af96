//! Showback and the residency trail as the API shows them.
//!
//! Showback is computed, not metered: a VM's use is its size times the
//! time it spent at each site, read from its residency trail (which the
//! store writes with every move), clipped to the month. So it needs no
//! agent counters, agrees with "where has this VM been" by construction,
//! and a month can be computed again at any time with the same answer
//! (at the sites' current prices and grid intensities).
//!
//! The power model (operator settings, `virt8ra server --power-*`):
//! a VM draws `watts_per_vcpu` per vCPU plus `watts_per_gib_memory` per
//! GiB of memory plus `watts_per_gib_disk` per GiB of disk, all the time
//! it is placed (reserved capacity, whatever its load), times the site's
//! PUE (or `default_pue`). Energy is that power over the hours; carbon is
//! the energy times the site's grid intensity. The defaults are Cloud
//! Carbon Footprint's coefficients: 3.5 W per vCPU (its upper bound for a
//! busy vCPU: capacity reserved is capacity powered), 0.392 W per GiB of
//! memory, 1.2 Wh per TB-hour of SSD (0.0012 W per GiB), and a PUE of
//! 1.58 (the Uptime Institute's 2023 industry average) for sites that
//! give none.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use virt8ra_api::{
    PowerModel, ResidencyInterval, SiteFacts, SiteUsage, UsageAmounts, UsageReport, VmHistory,
    VmUsage,
};

use crate::error::{ApiError, ApiResult};
use crate::state::Ctx;

/// The defaults of the power model (see the module doc).
pub const DEFAULT_POWER: PowerModel = PowerModel {
    watts_per_vcpu: 3.5,
    watts_per_gib_memory: 0.392,
    watts_per_gib_disk: 0.0012,
    default_pue: 1.58,
};

/// A VM's residency trail (by id or name; deleted VMs too).
pub async fn history(app: &Ctx, key: &str) -> ApiResult<VmHistory> {
    let vm = app.store.get_vm(key).await?;
    let intervals = app.store.vm_residency(&vm.id).await?;
    let mut countries: Vec<String> = intervals.iter().filter_map(|i| i.country.clone()).collect();
    countries.sort();
    countries.dedup();
    Ok(VmHistory {
        vm_id: vm.id,
        vm: vm.name,
        intervals,
        countries,
    })
}

/// `YYYY-MM` as the month's first instant and the next month's.
pub fn month_bounds(month: &str) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let bad = || ApiError::Invalid(format!("month {month:?} is not YYYY-MM (e.g. 2026-03)"));
    let (y, m) = month.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let first = NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?;
    let next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1)
    }
    .ok_or_else(bad)?;
    let at = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).ok_or_else(bad);
    Ok((at(first)?, at(next)?))
}

/// The showback of `month` (`YYYY-MM`; default: this month, up to now).
pub async fn report(app: &Ctx, month: Option<&str>) -> ApiResult<UsageReport> {
    let now = Utc::now();
    let month = month
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:04}-{:02}", now.year(), now.month()));
    let (from, end) = month_bounds(&month)?;
    if from > now {
        return Err(ApiError::Invalid(format!(
            "month {month} has not begun; usage is of months up to this one"
        )));
    }
    let to = end.min(now);
    let intervals = app.store.residency_between(from, to).await?;
    let facts: HashMap<String, SiteFacts> = app
        .store
        .list_sites()
        .await?
        .into_iter()
        .map(|s| (s.name, s.facts))
        .collect();
    let power = app.power.get().copied().unwrap_or(DEFAULT_POWER);
    // The grouping key: the VM's project ("-" for a VM no longer in the
    // index: deleted before the month's report was asked for).
    let group_of = |vm_id: &str| {
        app.vms
            .get(vm_id)
            .map(|v| v.project.clone())
            .unwrap_or_else(|| "-".into())
    };
    Ok(showback(
        &month,
        &intervals,
        &facts,
        (from, to),
        &power,
        group_of,
    ))
}

/// Cuts a report to one project's VMs: its rows, its group, and its
/// total as the report's.
pub fn only_project(r: &mut UsageReport, project: &str) {
    r.vms.retain(|v| v.group == project);
    r.groups.retain(|g, _| g == project);
    r.total = r.groups.get(project).cloned().unwrap_or_default();
}

/// Adds `b` into `a`.
fn add(a: &mut UsageAmounts, b: &UsageAmounts) {
    a.vcpu_hours += b.vcpu_hours;
    a.gib_hours += b.gib_hours;
    a.disk_gib_hours += b.disk_gib_hours;
    a.cost_eur += b.cost_eur;
    a.energy_kwh += b.energy_kwh;
    a.carbon_g += b.carbon_g;
    a.unknown_carbon_hours += b.unknown_carbon_hours;
}

/// The use of one interval within `[from, to)`: its hours and amounts.
/// An interval at no site (an export on the control plane) counts nothing.
pub fn interval_use(
    i: &ResidencyInterval,
    facts: Option<&SiteFacts>,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    power: &PowerModel,
) -> Option<(f64, UsageAmounts)> {
    i.site.as_ref()?;
    let start = i.from.max(from);
    let end = i.to.unwrap_or(to).min(to);
    if end <= start {
        return None;
    }
    let hours = (end - start).num_milliseconds() as f64 / 3_600_000.0;
    let none = SiteFacts::default();
    let f = facts.unwrap_or(&none);
    let vcpu_hours = i.vcpus as f64 * hours;
    let gib_hours = i.memory_mib as f64 / 1024.0 * hours;
    let disk_gib_hours = i.disk_gib as f64 * hours;
    let price = |p: Option<f64>| p.unwrap_or(0.0);
    let cost_eur = vcpu_hours * price(f.price_vcpu_hour)
        + gib_hours * price(f.price_gib_hour)
        + disk_gib_hours * price(f.price_disk_gib_hour);
    let watt_hours = vcpu_hours * power.watts_per_vcpu
        + gib_hours * power.watts_per_gib_memory
        + disk_gib_hours * power.watts_per_gib_disk;
    let energy_kwh = watt_hours / 1000.0 * f.pue.unwrap_or(power.default_pue);
    let (carbon_g, unknown_carbon_hours) = match f.grid_gco2_per_kwh {
        Some(g) => (energy_kwh * g, 0.0),
        None => (0.0, hours),
    };
    Some((
        hours,
        UsageAmounts {
            vcpu_hours,
            gib_hours,
            disk_gib_hours,
            cost_eur,
            energy_kwh,
            carbon_g,
            unknown_carbon_hours,
        },
    ))
}

/// Showback, pure: every interval clipped to `[from, to)`, priced at its
/// site's prices and turned into carbon by the power model; per VM (with
/// its sites), per group (`group_of` a VM id) and in total.
pub fn showback(
    month: &str,
    intervals: &[ResidencyInterval],
    facts: &HashMap<String, SiteFacts>,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    power: &PowerModel,
    group_of: impl Fn(&str) -> String,
) -> UsageReport {
    let mut vms: BTreeMap<String, VmUsage> = BTreeMap::new();
    for i in intervals {
        let site = i.site.clone().unwrap_or_default();
        let Some((hours, amounts)) = interval_use(i, facts.get(&site), (from, to), power) else {
            continue;
        };
        let row = vms.entry(i.vm_id.clone()).or_insert_with(|| VmUsage {
            vm_id: i.vm_id.clone(),
            vm: i.vm.clone(),
            group: group_of(&i.vm_id),
            amounts: UsageAmounts::default(),
            sites: vec![],
        });
        add(&mut row.amounts, &amounts);
        match row.sites.iter_mut().find(|s| s.site == site) {
            Some(s) => {
                s.hours += hours;
                add(&mut s.amounts, &amounts);
            }
            None => row.sites.push(SiteUsage {
                site,
                country: i.country.clone(),
                hours,
                amounts,
            }),
        }
    }
    let mut groups: BTreeMap<String, UsageAmounts> = BTreeMap::new();
    let mut total = UsageAmounts::default();
    for v in vms.values() {
        add(groups.entry(v.group.clone()).or_default(), &v.amounts);
        add(&mut total, &v.amounts);
    }
    UsageReport {
        month: month.to_string(),
        from,
        to,
        power_model: *power,
        vms: vms.into_values().collect(),
        groups,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use virt8ra_api::ResidencyReason;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap()
    }

    fn stay(
        vm: &str,
        site: &str,
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
    ) -> ResidencyInterval {
        ResidencyInterval {
            vm_id: format!("id-{vm}"),
            vm: vm.into(),
            seq: 1,
            copy: "vm".into(),
            reason: ResidencyReason::Created,
            detail: String::new(),
            host: None,
            host_id: None,
            site: Some(site.into()),
            provider: None,
            country: Some(site[..2].to_uppercase()),
            vcpus: 2,
            memory_mib: 4096,
            disk_gib: 20,
            from,
            to,
            ended_by: None,
        }
    }

    fn sites() -> HashMap<String, SiteFacts> {
        let f = |price_vcpu, price_gib, price_disk, gco2, pue| SiteFacts {
            grid_gco2_per_kwh: Some(gco2),
            pue: Some(pue),
            price_vcpu_hour: Some(price_vcpu),
            price_gib_hour: Some(price_gib),
            price_disk_gib_hour: Some(price_disk),
            access_latency_ms: None,
        };
        HashMap::from([
            ("es-madrid".into(), f(0.02, 0.005, 0.0001, 150.0, 1.2)),
            ("pl-gdansk".into(), f(0.01, 0.002, 0.0002, 700.0, 1.5)),
        ])
    }

    const POWER: PowerModel = PowerModel {
        watts_per_vcpu: 4.0,
        watts_per_gib_memory: 0.5,
        watts_per_gib_disk: 0.01,
        default_pue: 1.6,
    };

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    /// A scripted week: a 2 vCPU, 4 GiB, 20 GiB VM runs 3 days in Madrid
    /// (from Monday 00:00), is migrated, runs 4 days in Gdańsk and is still
    /// running when the week ends; its export (no site) counts nothing.
    #[test]
    fn a_scripted_week_matches_a_hand_computation() {
        let move_at = at(5, 0);
        let mut export = stay("web", "es-madrid", at(4, 0), None);
        export.site = None;
        let trail = [
            stay("web", "es-madrid", at(2, 0), Some(move_at)),
            stay("web", "pl-gdansk", move_at, None),
            export,
        ];
        let r = showback(
            "2026-03",
            &trail,
            &sites(),
            (at(2, 0), at(9, 0)),
            &POWER,
            |_| "p".into(),
        );
        // By hand. Madrid: 72 h. vCPU-h 2*72 = 144, GiB-h 4*72 = 288,
        // disk 20*72 = 1440. Cost 144*0.02 + 288*0.005 + 1440*0.0001
        // = 2.88 + 1.44 + 0.144 = 4.464 EUR. Power 2*4 + 4*0.5 + 20*0.01
        // = 10.2 W; 72 h = 734.4 Wh; *1.2 = 0.88128 kWh; *150 = 132.192 g.
        // Gdańsk: 96 h. vCPU-h 192, GiB-h 384, disk 1920. Cost 1.92 +
        // 0.768 + 0.384 = 3.072 EUR. 10.2 W * 96 h = 979.2 Wh; *1.5 =
        // 1.4688 kWh; *700 = 1028.16 g.
        assert_eq!(r.vms.len(), 1);
        let v = &r.vms[0];
        assert_eq!(v.sites.len(), 2);
        let (es, pl) = (&v.sites[0], &v.sites[1]);
        assert!(close(es.hours, 72.0) && close(pl.hours, 96.0));
        assert!(close(es.amounts.cost_eur, 4.464), "{}", es.amounts.cost_eur);
        assert!(close(es.amounts.energy_kwh, 0.88128));
        assert!(close(es.amounts.carbon_g, 132.192));
        assert!(close(pl.amounts.cost_eur, 3.072), "{}", pl.amounts.cost_eur);
        assert!(close(pl.amounts.energy_kwh, 1.4688));
        assert!(close(pl.amounts.carbon_g, 1028.16));
        let t = &r.total;
        assert!(close(t.vcpu_hours, 336.0));
        assert!(close(t.gib_hours, 672.0));
        assert!(close(t.disk_gib_hours, 3360.0));
        assert!(close(t.cost_eur, 7.536));
        assert!(close(t.carbon_g, 1160.352));
        assert_eq!(t.unknown_carbon_hours, 0.0);
        assert!(close(r.groups["p"].cost_eur, 7.536));
    }

    #[test]
    fn intervals_are_clipped_to_the_month_and_unknown_carbon_is_counted() {
        let (from, to) = month_bounds("2026-03").unwrap();
        assert_eq!(from, at(1, 0));
        assert_eq!(to, Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap());
        // From the last day of February to 02:00 on 1 March: 2 hours.
        let early = stay(
            "a",
            "es-madrid",
            from - chrono::Duration::hours(24),
            Some(at(1, 2)),
        );
        // A site with no facts: use counted, no price, carbon unknown.
        let nowhere = stay("b", "xx-gone", at(31, 22), None);
        let r = showback(
            "2026-03",
            &[early, nowhere],
            &sites(),
            (from, to),
            &POWER,
            |v| v.to_string(),
        );
        assert!(close(r.vms[0].amounts.vcpu_hours, 4.0));
        assert!(close(r.vms[1].amounts.vcpu_hours, 4.0));
        assert_eq!(r.vms[1].amounts.cost_eur, 0.0);
        assert!(close(r.vms[1].amounts.unknown_carbon_hours, 2.0));
        // The default PUE: 10.2 W * 2 h * 1.6.
        assert!(close(r.vms[1].amounts.energy_kwh, 0.03264));
        assert_eq!(r.groups.len(), 2);
        // Cut to one group (a project's view): its rows and its total.
        let mut one = r.clone();
        only_project(&mut one, "id-b");
        assert_eq!(one.vms.len(), 1);
        assert_eq!(one.vms[0].vm, "b");
        assert_eq!(one.groups.keys().collect::<Vec<_>>(), ["id-b"]);
        assert_eq!(one.total, r.groups["id-b"]);
        only_project(&mut one, "nobody");
        assert!(one.vms.is_empty() && one.total.vcpu_hours == 0.0);
    }

    #[test]
    fn months_are_yyyy_mm() {
        for bad in ["2026-3", "2026-13", "26-03", "march", "2026-03-01", ""] {
            assert!(month_bounds(bad).is_err(), "{bad}");
        }
        let (from, to) = month_bounds("2026-12").unwrap();
        assert_eq!(to - from, chrono::Duration::days(31));
    }
}
