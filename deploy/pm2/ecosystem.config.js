// Crucible miner and validator under PM2 (see deploy/README.md):
//   pm2 start deploy/pm2/ecosystem.config.js            # every role whose env file exists
//   pm2 start deploy/pm2/ecosystem.config.js --only crucible-miner
//   pm2 logs crucible-miner; pm2 save; pm2 startup
// Each role reads its settings from deploy/<role>.env (a copy of deploy/crucible.env.example), or from the
// file named by CRUCIBLE_MINER_ENV / CRUCIBLE_VALIDATOR_ENV. NETWORK, NETUID, ... become flags; the
// CRUCIBLE_BUCKET_* keys reach crucible through its environment only, never its command line (`ps`).
// Note: `pm2 save` writes the environment into ~/.pm2/dump.pm2; keep ~/.pm2 private (chmod 700).
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");

const ROOT = path.resolve(__dirname, "..", "..");

// KEY=VALUE lines; '#' comments and blank lines skipped; optional quotes removed; a leading ~/ is $HOME.
function readEnv(file) {
  const env = {};
  for (const line of fs.readFileSync(file, "utf8").split(/\r?\n/)) {
    const m = line.match(/^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$/);
    if (!m || line.trim().startsWith("#")) continue;
    let value = m[2].replace(/^(['"])(.*)\1$/, "$2");
    if (value.startsWith("~/")) value = path.join(os.homedir(), value.slice(2));
    env[m[1]] = value;
  }
  return env;
}

function node(role) {
  const file = process.env[`CRUCIBLE_${role.toUpperCase()}_ENV`] || path.join(ROOT, "deploy", `${role}.env`);
  if (!fs.existsSync(file)) return null;
  const env = readEnv(file);
  const missing = ["NETUID", "PRESET", "DATA"].filter((k) => !env[k]);
  if (missing.length) throw new Error(`${file}: set ${missing.join(", ")}`);
  const flag = (name, key, fallback) => (env[key] || fallback ? [name, env[key] || fallback] : []);
  const args = [
    role,
    ...flag("--network", "NETWORK", "finney"), ...flag("--netuid", "NETUID"),
    ...flag("--wallet.name", "WALLET_NAME"), ...flag("--wallet.hotkey", "WALLET_HOTKEY"),
    ...flag("--wallet.path", "WALLET_PATH"), ...flag("--preset", "PRESET"), ...flag("--data", "DATA"),
    ...(env.STATE_DIR ? ["--state-dir", path.join(env.STATE_DIR, role)] : []),
    ...flag("--device", "DEVICE"), ...flag("--log-level", "LOG_LEVEL"), ...flag("--metrics.port", "METRICS_PORT"),
  ];
  const bucket = Object.fromEntries(Object.entries(env).filter(([k]) => k.startsWith("CRUCIBLE_BUCKET_")));
  return {
    name: `crucible-${role}`,
    script: path.join(ROOT, ".venv", "bin", "crucible"),
    interpreter: "none",
    args,
    cwd: ROOT,
    env: { ...bucket, PYTHONUNBUFFERED: "1" },
    autorestart: true,
    restart_delay: 60000, // a start-up check failed (exit 1): try again in a minute
    stop_exit_codes: [2], // a bad flag or setting: restarting cannot fix it (the log's last line says why)
    kill_signal: "SIGINT",
    kill_timeout: 90000,
    time: true,
    merge_logs: true,
  };
}

module.exports = { apps: ["miner", "validator"].map(node).filter(Boolean) };
