-- Users a resync creates at an edge, noted before it creates them: a resync
-- interrupted between the creates and their passwords (an edge or central
-- killed) sets the passwords it planned when it runs again, and lists the users
-- it cannot give one as needing a password. Cleared when a resync completes.
CREATE TABLE resync_users (
    edge      TEXT NOT NULL REFERENCES edges (id),
    user_id   TEXT NOT NULL,
    user_key  TEXT NOT NULL,
    PRIMARY KEY (edge, user_id)
) WITHOUT ROWID;
