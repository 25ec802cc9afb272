"""The Docker files, checked without a Docker engine.

No machine of the project runs Docker, so these tests read what Docker would read: the compose files
(PyYAML, with compose's `${VAR}` interpolation done here from docker/.env.example), the Dockerfile and
.dockerignore. Every service's command goes through the real `crucible` argument parser and node
commands through the real `NodeConfig` (bucket settings from the service's environment, as in the
container), and the S3 key file compose writes through the devnet S3 server's own loader; variables
must be documented, and no secret may be baked into the image or written into a compose file.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from devnet.s3 import S3Server, load_or_create_keys
from neurons.cli import COMMANDS, build_parser
from neurons.node_config import NODE_FLAGS, NodeConfig, bucket_credentials

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ("compose.yml", "compose.devnet.yml")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# What an operator fills in where .env.example leaves a value empty (compose refuses to start without).
OPERATOR = {
    "NETUID": "7",
    "PRESET": str(ROOT / "tests" / "assets" / "hparams" / "network-150m.toml"),  # the subnet's hparams file
    "CRUCIBLE_BUCKET_ENDPOINT": "https://account.r2.cloudflarestorage.com",
    "CRUCIBLE_BUCKET_NAME": "my-crucible-bucket",
    "CRUCIBLE_BUCKET_READ_KEY": "R" * 20,
    "CRUCIBLE_BUCKET_READ_SECRET": "r" * 40,
    "CRUCIBLE_BUCKET_WRITE_KEY": "W" * 20,
    "CRUCIBLE_BUCKET_WRITE_SECRET": "w" * 40,
}
SECRET_WORDS = ("SECRET", "PASSWORD", "PASSWD", "MNEMONIC", "PRIVATE", "CREDENTIAL", "SEED")
SECRET_PARTS = {"KEY", "KEYS", "TOKEN", "PASS", "PWD"}
NODE_COMMANDS = ("miner", "validator")
BUCKET_ENV = set(NODE_FLAGS.env.values())  # CRUCIBLE_BUCKET_*


class MissingVariable(ValueError):
    pass


def secret_like(name: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in SECRET_WORDS) or bool(SECRET_PARTS & set(re.split(r"[^A-Z0-9]+", upper)))


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?err}, ${V?err}; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        missing = val is None or (val == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else val
        if op in (":?", "?") and missing:
            raise MissingVariable(f"{name}: {arg}")
        return val or ""

    return VAR_RE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def read_env_example() -> dict[str, str]:
    env = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


ENV_EXAMPLE = read_env_example()
ENV = {**ENV_EXAMPLE, **{k: v for k, v in OPERATOR.items() if not ENV_EXAMPLE.get(k)}}
RAW = {name: yaml.safe_load((DOCKER / name).read_text()) for name in COMPOSE_FILES}
COMPOSE = {name: interpolate(doc, ENV) for name, doc in RAW.items()}
SERVICES = [(f, s) for f in COMPOSE_FILES for s in RAW[f]["services"]]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def parse(cli, argv: list[str]):
    try:
        args = cli.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"crucible {' '.join(argv)}: the CLI parser refused it (exit {exc.code})")
    assert args.command in COMMANDS
    return args


def node_role(argv: list[str]) -> str | None:
    """'miner' or 'validator' for `crucible miner|validator …` and `crucible devnet miner|validator …`."""
    role = argv[1] if argv[0] == "devnet" else argv[0]
    return role if role in NODE_COMMANDS else None


def options(argv: list[str]) -> dict[str, list[str]]:
    """--flag value / --flag=value pairs of a command line (repeated flags keep every value)."""
    out: dict[str, list[str]] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            flag, eq, val = arg.partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            out.setdefault(flag, []).append(val if eq else ("" if nxt.startswith("--") else nxt))
    return out


def test_interpolation_follows_compose():
    env = {"A": "1", "E": ""}
    assert interpolate("${A}-${B:-x}-${E:-y}-${E-z}-$${A}", env) == "1-x-y--${A}"
    with pytest.raises(MissingVariable):
        interpolate("${E:?fill it in}", env)
    assert interpolate("${E?set}", env) == ""


@pytest.mark.parametrize("file,service", SERVICES)
def test_every_service_runs_a_crucible_command_the_cli_accepts(parser, file, service):
    svc = COMPOSE[file]["services"][service]
    assert svc.get("entrypoint") in (None, ["crucible"]), "the image's ENTRYPOINT must stay `crucible`"
    assert svc["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / svc["build"]["context"]).resolve() == ROOT
    argv = svc["command"]
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), "commands are exec-form lists"
    args = parse(parser, argv)
    if node_role(argv):
        config = NODE_FLAGS.parse(args).chain  # --netuid present, wallet flags read, every value valid
        assert config.wallet_path == ("/wallets" if file == "compose.yml" else "/state/chain/wallets")
        # production commands dial the network by name; only `crucible devnet …` plugs in the devnet chain
        assert (argv[0] == "devnet") == (file == "compose.devnet.yml") == config.network.startswith("devnet://")
        flags = options(argv)
        assert not [f for f in flags if f.startswith("--bucket.") and secret_like(f)], "keys never go on argv"


def test_example_leaves_only_required_values_empty():
    """An empty value in .env.example must make compose refuse to start, never run with nothing."""
    empty = {k for k, v in ENV_EXAMPLE.items() if v == ""}
    assert empty == set(OPERATOR), "update OPERATOR with what an operator must fill in"
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text()
        for m in VAR_RE.finditer(text):
            if m.group(1) in empty:
                assert m.group(2) == ":?", f"{name}: ${{{m.group(1)}}} is empty in .env.example but not required"
    with pytest.raises(MissingVariable):
        interpolate(RAW["compose.yml"], ENV_EXAMPLE)


def test_every_variable_is_documented_and_in_the_example():
    used = {m.group(1) for f in COMPOSE_FILES for m in VAR_RE.finditer((DOCKER / f).read_text())}
    readme = (DOCKER / "README.md").read_text()
    assert used, "no variables found"
    assert not sorted(used - set(ENV_EXAMPLE)), "variables missing from docker/.env.example"
    assert not sorted(v for v in used if f"`{v}`" not in readme), "variables missing from docker/README.md"
    assert not sorted(set(ENV_EXAMPLE) - used), ".env.example holds variables no compose file uses"


def test_mainnet_nodes_take_bucket_settings_from_the_environment(parser, monkeypatch):
    for service in NODE_COMMANDS:
        raw = RAW["compose.yml"]["services"][service]
        assert set(raw["environment"]) == BUCKET_ENV
        svc = COMPOSE["compose.yml"]["services"][service]
        creds = credentials_of(svc, monkeypatch)
        assert creds.write.secret_access_key.get_secret_value() == OPERATOR["CRUCIBLE_BUCKET_WRITE_SECRET"]
        assert creds.read.bucket == OPERATOR["CRUCIBLE_BUCKET_NAME"]


def node_config_of(svc: dict, monkeypatch) -> NodeConfig:
    """The service's NodeConfig, built inside its environment (where CRUCIBLE_BUCKET_* are read)."""
    with monkeypatch.context() as m:
        for name in BUCKET_ENV:
            m.delenv(name, raising=False)
        for key, value in svc.get("environment", {}).items():
            m.setenv(key, str(value))
        return NODE_FLAGS.parse(parse(build_parser(), svc["command"]))


def credentials_of(svc: dict, monkeypatch):
    return bucket_credentials(node_config_of(svc, monkeypatch).bucket)


def test_devnet_parts_agree_with_each_other(monkeypatch, tmp_path):
    services = COMPOSE["compose.devnet.yml"]["services"]
    init, chain, s3 = (options(services[n]["command"]) for n in ("init", "chain", "s3"))
    assert chain["--state"] == init["--state"]
    chain_port, s3_port = chain["--port"][0], s3["--port"][0]
    assert services["chain"]["healthcheck"]["test"][-1] == chain_port
    assert services["s3"]["healthcheck"]["test"][-1] == s3_port
    # S3 keys: the file compose writes is the one `crucible devnet s3 --dir` loads, and the keys work.
    (config,) = services["s3"]["configs"]
    assert config["target"] == f"{s3['--dir'][0]}/credentials.json"
    content = COMPOSE["compose.devnet.yml"]["configs"][config["source"]]["content"]
    (tmp_path / "credentials.json").write_text(content)
    write, read = load_or_create_keys(tmp_path)
    S3Server(tmp_path, int(s3_port), write.access_key, write.secret_key, read_key=read)  # validates the keys
    nodes = [n for n, svc in services.items() if node_role(svc["command"])]
    assert {"validator-0", "miner-0", "miner-1", "miner-2"} <= set(nodes)
    wallets = {n: options(services[n]["command"])["--wallet.name"][0] for n in nodes}
    assert len(set(wallets.values())) == len(nodes), "two nodes share a wallet"
    for name in nodes:
        svc, flags = services[name], options(services[name]["command"])
        assert svc["network_mode"] == "service:chain", "the servers bind 127.0.0.1: share chain's namespace"
        assert flags["--network"] == [f"devnet://127.0.0.1:{chain_port}"]
        assert flags["--netuid"] == init["--netuid"]
        assert flags["--wallet.path"] == [f"{init['--state'][0]}/wallets"]
        assert flags["--data"] == [options(services["data"]["command"])["--out"][0]]
        assert flags["--bucket.name"][0] in s3["--bucket"]
        creds = credentials_of(svc, monkeypatch)
        assert creds.write.endpoint_url == f"http://127.0.0.1:{s3_port}"
        assert (creds.write.access_key_id, creds.read.access_key_id) == (write.access_key, read.access_key)
        secrets = (creds.write.secret_access_key.get_secret_value(), creds.read.secret_access_key.get_secret_value())
        assert secrets == (write.secret_key, read.secret_key)
    adversary = services["adversary"]["command"]  # only the devnet's miner takes --adversary
    assert adversary[:2] == ["devnet", "miner"]
    assert parse(build_parser(), adversary).adversary == ENV["DEVNET_ADVERSARY"]
    miners = int(init["--miners"][0])
    assert all(w in {f"miner-{i}" for i in range(miners)} | {"validator-0"} for w in wallets.values())


def test_node_services_mount_wallets_read_only_and_reserve_the_gpu():
    for service in NODE_COMMANDS:
        svc = COMPOSE["compose.yml"]["services"][service]
        assert any(v.endswith(":/wallets:ro") for v in svc["volumes"]), "wallets must be mounted read-only"
        assert "data:/data:ro" in svc["volumes"]
        assert svc["restart"] in ("always", "unless-stopped")
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in device["capabilities"]
    for name in COMPOSE_FILES:
        for service, svc in COMPOSE[name]["services"].items():
            assert "restart" in svc, f"{name}: {service} has no restart policy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_bakes_in_no_secret_and_runs_crucible_unprivileged():
    ins = dockerfile_instructions()
    names = [arg.split("=", 1)[0] for op, arg in ins if op == "ARG"]
    for op, arg in ins:
        if op == "ENV":
            names += re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", arg)
    assert names and not [n for n in names if secret_like(n)], "a build argument or ENV named like a secret"
    assert sum(op == "FROM" for op, _ in ins) >= 3, "multi-stage: uv, builder, runtime"
    assert [json.loads(arg) for op, arg in ins if op == "ENTRYPOINT"] == [["crucible"]]
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime user must not be root"
    (volumes,) = [json.loads(arg) for op, arg in ins if op == "VOLUME"]
    assert set(volumes) == {"/wallets", "/data", "/state"}
    copies = [arg.split()[:-1] for op, arg in ins if op == "COPY" and "--from=" not in arg]
    sources = {s for c in copies for s in c}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in find["include"]}
    assert sources == {"pyproject.toml", "README.md"} | packages, "the image needs every package, nothing else"
    cpu_index = [arg for op, arg in ins if op == "RUN" and "download.pytorch.org/whl" in arg]
    assert cpu_index and "cuda) uv pip install" in cpu_index[0], "PyTorch's index only for cpu/cuNNN"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is out when a pattern matches it or one of its parent folders."""
    parts, excluded = path.split("/"), False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_secrets_and_state_out_but_the_package_in():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    out = [".env", "docker/.env", "docker/validator.env", "wallets/default/hotkeys/default", "wallets/w/x",
           "home/.bittensor/wallets/x/coldkey", "data/tiny/index.json", "state/nodes/x", ".venv/bin/python",
           ".devnet/chain/state.json", "s3/credentials.json", ".git/config"]
    assert not [p for p in out if not dockerignore_excludes(p, patterns)]
    needed = ["pyproject.toml", "README.md", "protocol/data.py", "gauntlet/state.py", "neurons/cli.py",
              "devnet/s3.py", "transport/chain.py", "bench/codec.py", "docker/Dockerfile"]
    assert not [p for p in needed if dockerignore_excludes(p, patterns)]


def test_compose_files_take_secrets_only_from_variables():
    for name in COMPOSE_FILES:
        for service, svc in RAW[name]["services"].items():
            for key, value in svc.get("environment", {}).items():
                if secret_like(key):
                    m = VAR_RE.fullmatch(str(value))
                    assert m and m.group(2) in (None, ":?", "?"), f"{name}: {service}.{key} must be ${{VAR}}"
            assert not [a for a in svc.get("build", {}).get("args", {}) if secret_like(a)]
            assert not [a for a in svc["command"] if re.match(r"--bucket\.(read|write)-(key|secret)", a)]
        for config in RAW[name].get("configs", {}).values():
            blanked = json.loads(re.sub(r'"\$\{[^}]*\}"', '""', config["content"]))  # each value a ${VAR}?
            values = [v for side in blanked.values() for v in side.values()]
            assert values and all(v == "" for v in values), f"{name}: a config holds a literal key"
    for key, value in ENV_EXAMPLE.items():
        if secret_like(key) and not key.startswith("DEVNET_"):
            assert value == "", f".env.example ships a value for {key}"
