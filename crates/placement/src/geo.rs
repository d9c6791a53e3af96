//! Distances and the latency model.
//!
//! Where the system has measured round-trip times between a user location and
//! a site it uses them. Otherwise it estimates: light in fibre travels at about
//! two thirds of c, some 200 km per millisecond; real routes are longer than
//! the great circle (route factor, default 1.5); a round trip doubles it; and
//! the site adds its access latency (router to host; default 1 ms for a core
//! site, 0.5 ms for an edge site). So RTT ≈ 0.015 ms/km × distance + access.
//! The model errs on the optimistic side for long, indirect routes; measured
//! figures override it.

/// Mean Earth radius in km.
const EARTH_KM: f64 = 6371.0;
/// One-way speed of light in fibre, km per ms.
pub const FIBRE_KM_PER_MS: f64 = 200.0;
/// Real routes are longer than the great circle.
pub const ROUTE_FACTOR: f64 = 1.5;

/// Great-circle distance in km (haversine).
pub fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_KM * a.sqrt().atan2((1.0 - a).sqrt())
}

/// Modelled round-trip time in ms from a point to a site.
pub fn model_rtt_ms(lat: f64, lon: f64, site_lat: f64, site_lon: f64, access_ms: f64) -> f64 {
    2.0 * distance_km(lat, lon, site_lat, site_lon) * ROUTE_FACTOR / FIBRE_KM_PER_MS + access_ms
}

/// Places users may be, known by name: the cities of the example topology
/// and of `shared/data/eu-user-locations.csv`, and European capitals.
pub const CITIES: &[(&str, &str, f64, f64)] = &[
    ("Barcelona", "ES", 41.3874, 2.1686),
    ("Bilbao", "ES", 43.2630, -2.9350),
    ("Seville", "ES", 37.3891, -5.9845),
    ("Madrid", "ES", 40.4168, -3.7038),
    ("Logroño", "ES", 42.4627, -2.4449),
    ("Mondragón", "ES", 43.0643, -2.4899),
    ("Rotterdam", "NL", 51.9244, 4.4777),
    ("Amsterdam", "NL", 52.3676, 4.9041),
    ("Ede", "NL", 52.0402, 5.6649),
    ("Munich", "DE", 48.1351, 11.5820),
    ("Hamburg", "DE", 53.5511, 9.9937),
    ("Berlin", "DE", 52.5200, 13.4050),
    ("Karlsruhe", "DE", 49.0069, 8.4037),
    ("Frankfurt", "DE", 50.1109, 8.6821),
    ("Kraków", "PL", 50.0647, 19.9450),
    ("Poznań", "PL", 52.4064, 16.9252),
    ("Gdańsk", "PL", 54.3520, 18.6466),
    ("Warsaw", "PL", 52.2297, 21.0122),
    ("Maribor", "SI", 46.5547, 15.6459),
    ("Ljubljana", "SI", 46.0569, 14.5058),
    ("Split", "HR", 43.5081, 16.4402),
    ("Zagreb", "HR", 45.8150, 15.9819),
    ("Lyon", "FR", 45.7640, 4.8357),
    ("Paris", "FR", 48.8566, 2.3522),
    ("Lisbon", "PT", 38.7223, -9.1393),
    ("Vienna", "AT", 48.2082, 16.3738),
    ("Stockholm", "SE", 59.3293, 18.0686),
    ("Brussels", "BE", 50.8503, 4.3517),
    ("Rome", "IT", 41.9028, 12.4964),
    ("Milan", "IT", 45.4642, 9.1900),
    ("Prague", "CZ", 50.0755, 14.4378),
    ("Copenhagen", "DK", 55.6761, 12.5683),
    ("Helsinki", "FI", 60.1699, 24.9384),
    ("Dublin", "IE", 53.3498, -6.2603),
    ("Athens", "GR", 37.9838, 23.7275),
    ("Budapest", "HU", 47.4979, 19.0402),
    ("Bucharest", "RO", 44.4268, 26.1025),
    ("Sofia", "BG", 42.6977, 23.3219),
    ("Oslo", "NO", 59.9139, 10.7522),
    ("Zurich", "CH", 47.3769, 8.5417),
];

/// Coordinates of a known city (case-insensitive; ASCII spellings accepted,
/// e.g. "Gdansk" for "Gdańsk").
pub fn city(name: &str) -> Option<(f64, f64)> {
    let want = fold(name);
    CITIES
        .iter()
        .find(|(n, ..)| fold(n) == want)
        .map(|(_, _, lat, lon)| (*lat, *lon))
}

fn fold(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| match c {
            'ń' | 'Ń' => 'n',
            'ñ' | 'Ñ' => 'n',
            'ó' | 'Ó' => 'o',
            'ł' | 'Ł' => 'l',
            'ś' | 'Ś' => 's',
            'ź' | 'ż' | 'Ź' | 'Ż' => 'z',
            'ą' => 'a',
            'ę' => 'e',
            'é' => 'e',
            'ü' => 'u',
            'ö' => 'o',
            'ä' => 'a',
            c => c,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn between(a: &str, b: &str) -> f64 {
        let (la, lo) = city(a).unwrap();
        let (lb, lob) = city(b).unwrap();
        distance_km(la, lo, lb, lob)
    }

    #[test]
    fn great_circle_distances_of_known_city_pairs() {
        // Reference great-circle distances (km).
        for (a, b, km) in [
            ("Madrid", "Warsaw", 2290.0),
            ("Gdańsk", "Warsaw", 284.0),
            ("Paris", "Frankfurt", 479.0),
            ("Lisbon", "Stockholm", 2987.0),
            ("Berlin", "Munich", 504.0),
        ] {
            let d = between(a, b);
            assert!(
                (d - km).abs() / km < 0.02,
                "{a}-{b}: {d:.0} km, expected about {km}"
            );
        }
        assert!(between("Zagreb", "Zagreb") < 1e-9);
    }

    #[test]
    fn modelled_round_trip_times_are_plausible() {
        let (glat, glon) = city("Gdansk").unwrap();
        let (wlat, wlon) = city("Warsaw").unwrap();
        let (mlat, mlon) = city("Madrid").unwrap();
        // Same city: only the access latency.
        assert!((model_rtt_ms(glat, glon, glat, glon, 0.5) - 0.5).abs() < 1e-9);
        // Gdańsk - Warsaw: a few ms (measured pings are 5-10 ms).
        let gw = model_rtt_ms(glat, glon, wlat, wlon, 1.0);
        assert!((4.0..10.0).contains(&gw), "{gw}");
        // Madrid - Warsaw: tens of ms (measured pings are 40-60 ms).
        let mw = model_rtt_ms(mlat, mlon, wlat, wlon, 1.0);
        assert!((30.0..60.0).contains(&mw), "{mw}");
        // Monotone in distance.
        assert!(mw > gw);
    }

    #[test]
    fn city_names_fold_diacritics_and_case() {
        assert_eq!(city("GDAŃSK"), city("gdansk"));
        assert!(city("Atlantis").is_none());
    }
}
