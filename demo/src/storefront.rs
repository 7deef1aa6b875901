//! The storefront the demo protects: which "containers" exist, which image
//! each runs, which port it serves, and which connections its normal
//! traffic makes. Everything else the demo does is derived from this table,
//! so adding a service here adds its namespace, its listener, its traffic
//! and its line in the inventory.

/// One service of the storefront: one container (network namespace) on the
/// demo node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// Short name; also the container name and part of the namespace name.
    pub name: &'static str,
    /// Image name as a registry would show it.
    pub image: &'static str,
    /// The TCP port the service listens on.
    pub port: u16,
}

/// The services, in address order: the n-th gets host number `FIRST_HOST + n`.
pub const SERVICES: &[Service] = &[
    Service {
        name: "front-end",
        image: "storefront/front-end:0.3.12",
        port: 8079,
    },
    Service {
        name: "catalogue",
        image: "storefront/catalogue:0.3.5",
        port: 80,
    },
    Service {
        name: "catalogue-db",
        image: "storefront/catalogue-db:0.3.0",
        port: 3306,
    },
    Service {
        name: "carts",
        image: "storefront/carts:0.4.8",
        port: 80,
    },
    Service {
        name: "carts-db",
        image: "mongo:3.4",
        port: 27017,
    },
    Service {
        name: "orders",
        image: "storefront/orders:0.4.7",
        port: 80,
    },
    Service {
        name: "orders-db",
        image: "mongo:3.4",
        port: 27017,
    },
    Service {
        name: "payment",
        image: "storefront/payment:0.4.3",
        port: 80,
    },
    Service {
        name: "shipping",
        image: "storefront/shipping:0.4.8",
        port: 80,
    },
    Service {
        name: "queue",
        image: "rabbitmq:3.6.8",
        port: 5672,
    },
    Service {
        name: "user",
        image: "storefront/user:0.4.4",
        port: 80,
    },
    Service {
        name: "user-db",
        image: "storefront/user-db:0.4.0",
        port: 27017,
    },
];

/// Host number of the first service in the demo subnet.
pub const FIRST_HOST: u8 = 11;

/// The connections normal shop traffic makes: (client, server), each to
/// the server's port.
pub const EDGES: &[(&str, &str)] = &[
    ("front-end", "catalogue"),
    ("front-end", "carts"),
    ("front-end", "orders"),
    ("front-end", "user"),
    ("catalogue", "catalogue-db"),
    ("carts", "carts-db"),
    ("orders", "orders-db"),
    ("orders", "payment"),
    ("orders", "shipping"),
    ("orders", "user"),
    ("orders", "carts"),
    ("shipping", "queue"),
    ("user", "user-db"),
];

/// The container an attacker holds: the one facing the internet.
pub const COMPROMISED: &str = "front-end";
/// The database the attacker tries to reach: not one the front end uses.
pub const TARGET_DATABASE: &str = "orders-db";

/// The service named `name`.
pub fn service(name: &str) -> Option<&'static Service> {
    SERVICES.iter().find(|service| service.name == name)
}

/// Position of `name` in [`SERVICES`].
pub fn index_of(name: &str) -> Option<usize> {
    SERVICES.iter().position(|service| service.name == name)
}

/// The image ID of an image name: a stable, made-up content digest, so a
/// second run of the demo names the same images.
pub fn image_id(image: &str) -> String {
    // FNV-1a, widened to 256 bits by hashing four salted copies: stable
    // across runs and platforms, which a digest of this kind only needs to be.
    let mut digest = String::from("sha256:");
    for salt in 0u8..4 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in std::iter::once(salt).chain(image.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        digest.push_str(&format!("{hash:016x}"));
    }
    digest
}

/// The servers each client connects to, by client.
pub fn targets_of(client: &str) -> Vec<&'static Service> {
    EDGES
        .iter()
        .filter(|(from, _)| *from == client)
        .filter_map(|(_, to)| service(to))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_edge_names_known_services_and_the_attack_is_not_an_edge() {
        for (from, to) in EDGES {
            assert!(service(from).is_some(), "{from}");
            assert!(service(to).is_some(), "{to}");
        }
        assert!(!EDGES.contains(&(COMPROMISED, TARGET_DATABASE)));
        assert!(service(COMPROMISED).is_some() && service(TARGET_DATABASE).is_some());
    }

    #[test]
    fn image_ids_are_stable_distinct_and_well_formed() {
        let a = image_id("storefront/carts:0.4.8");
        assert_eq!(a, image_id("storefront/carts:0.4.8"));
        assert_ne!(a, image_id("storefront/orders:0.4.7"));
        assert_eq!(a.len(), "sha256:".len() + 64);
        assert!(a["sha256:".len()..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn two_databases_of_one_image_share_an_image_id() {
        assert_eq!(
            image_id(service("carts-db").unwrap().image),
            image_id(service("orders-db").unwrap().image)
        );
    }
}
