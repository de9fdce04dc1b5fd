//! The database settings the Helm chart gives the operator: connection parts in libpq's `PG*`
//! variables under `DATABASE_URL=postgres://` (so a password needs no URL escaping), and
//! `PGSSLMODE` as the default sslmode of a URL that names none.

use std::process::Output;

use mailpoll_testkit::pg::TestDatabase;
use sqlx::postgres::PgConnectOptions;

const PG_VARIABLES: [&str; 7] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSSLMODE",
];

/// Runs `mailpoll migrate` with exactly these database variables.
async fn migrate_with(env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"));
    command.arg("migrate").env_remove("DATABASE_URL");
    for name in PG_VARIABLES {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .env("MAILPOLL_DB_MAX_CONNECTIONS", "2")
        .kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("mailpoll migrate finishes within 60 s")
        .expect("run mailpoll migrate")
}

async fn applied_migrations(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
}

#[tokio::test]
async fn connection_parts_come_from_libpq_variables_under_an_empty_url() {
    let db = TestDatabase::create_empty().await.expect("test database");
    let server: PgConnectOptions = db.url.parse().expect("test database URL");
    // A role of its own whose password would break a URL; it owns the database so it may
    // create the schema there.
    let role = format!("{}_owner", db.name);
    let password = "p@ss:w/rd#?&%=";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"
    )))
    .execute(&db.pool)
    .await
    .expect("create role");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" OWNER TO \"{role}\"",
        db.name
    )))
    .execute(&db.pool)
    .await
    .expect("hand the database to the role");

    let port = server.get_port().to_string();
    let output = migrate_with(&[
        ("DATABASE_URL", "postgres://"),
        ("PGHOST", server.get_host()),
        ("PGPORT", &port),
        ("PGUSER", &role),
        ("PGPASSWORD", password),
        ("PGDATABASE", &db.name),
        ("PGSSLMODE", "prefer"),
    ])
    .await;
    assert!(
        output.status.success(),
        "migrate from PG* variables failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        applied_migrations(&db).await >= 1,
        "the migrations landed in PGDATABASE"
    );
    let owner: String = sqlx::query_scalar(
        "SELECT tableowner::text FROM pg_tables WHERE tablename = '_sqlx_migrations'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("owner of the migrations table");
    assert_eq!(owner, role, "the operator connected as PGUSER");
}

#[tokio::test]
async fn pgsslmode_is_the_default_that_a_url_may_override() {
    let db = TestDatabase::create_empty().await.expect("test database");
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .expect("server ssl setting");
    let url_with_mode = format!(
        "{}{}sslmode=disable",
        db.url,
        if db.url.contains('?') { '&' } else { '?' }
    );

    // The URL's own sslmode wins over the variable.
    let output = migrate_with(&[("DATABASE_URL", &url_with_mode), ("PGSSLMODE", "require")]).await;
    assert!(
        output.status.success(),
        "sslmode=disable in the URL should win over PGSSLMODE=require: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Without one in the URL, the variable applies: `require` cannot be met by a server
    // without TLS.
    if ssl == "off" {
        let output = migrate_with(&[("DATABASE_URL", &db.url), ("PGSSLMODE", "require")]).await;
        assert!(
            !output.status.success(),
            "PGSSLMODE=require must refuse a server without TLS"
        );
    }
}
