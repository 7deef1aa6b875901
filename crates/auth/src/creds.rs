//! The `.creds` file: a user JWT and the user's nkey seed, in the armoured
//! text form NATS clients read (async-nats `ConnectOptions::credentials_file`,
//! the `nats` CLI, nats.go).

use nkeys::KeyPair;

use crate::AuthError;

/// The text of a creds file for `user_jwt` and the user's key.
pub fn format(user_jwt: &str, user: &KeyPair) -> Result<String, AuthError> {
    let seed = user.seed().map_err(|error| AuthError::Key(error.to_string()))?;
    Ok(format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    ))
}

/// The user JWT in the text of a creds file.
pub fn jwt_of(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN NATS USER JWT-----")?;
    text[start..].lines().nth(1).map(str::trim)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_jwt_is_found_again() {
        let user = nkeys::KeyPair::new_user();
        let text = super::format("eyJ.x.y", &user).unwrap();
        assert_eq!(super::jwt_of(&text), Some("eyJ.x.y"));
        assert!(text.contains(&user.seed().unwrap()));
    }
}
