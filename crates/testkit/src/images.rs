//! Synthetic container images for test and benchmark fleets: the same
//! index always gives the same ID and name, so two benchmarks that build
//! "image 42" build the same one.

/// Image ID of image `i`: `sha256:` and 64 hex digits, like a real digest.
pub fn image_id(i: u32) -> String {
    let x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!(
        "sha256:{x:016x}{:016x}{x:016x}{:016x}",
        x.rotate_left(17),
        x.rotate_left(41)
    )
}

/// Image name of image `i`: a registry path with a team, an app and a tag.
pub fn image_name(i: u32) -> String {
    format!("registry.example/team-{}/app-{i}:v{}", i % 50, i % 7)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_look_like_digests_and_differ() {
        let (a, b) = (super::image_id(1), super::image_id(2));
        assert_eq!(a.len(), "sha256:".len() + 64);
        assert!(a.starts_with("sha256:") && a[7..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(super::image_name(51), "registry.example/team-1/app-51:v2");
    }
}
