"""One Settings object, read from the environment and `.env` (environment wins).

Every process builds it once with `Settings.load()` and passes it on explicitly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from dataclasses import field as setting
from pathlib import Path
from urllib.parse import quote

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The recorded market data (../shared/data); TRADEWATCH_SHARED_DATA overrides the location."""
    candidates = [os.environ.get("TRADEWATCH_SHARED_DATA"), PROJECT_ROOT.parent / "shared" / "data",
                  Path("/work/shared/data")]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return PROJECT_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Settings:
    tradewatch_home: str = ".tradewatch/demo"
    log_format: str = "text"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    kafka_brokers: int = 1
    kafka_client: str = "confluent"
    trades_topic: str = "trades"
    alerts_topic: str = "alerts"
    candles_topic: str = "candles"           # each final candle with its indicators (the aggregator)
    quotes_topic: str = "quotes"             # order book messages (tradewatch/book.py), TRADES_PARTITIONS partitions
    trades_partitions: int = 10
    kafka_retention_hours: float = 168.0
    kafka_retention_mb: int = 500             # per partition
    partition_symbols: str = "AAPL,GOOGL,MSFT,AMZN,TSLA,META,NVDA,JPM,BTC-USD,ETH-USD"
    postgres_host: str = "127.0.0.1"
    postgres_port: int = 5432
    postgres_db: str = "tradewatch"
    postgres_user: str = "tradewatch"
    # empty: the local stack's generated one (TRADEWATCH_HOME/postgres-password); secrets stay out of repr()
    postgres_password: str = setting(default="", repr=False)
    consumer_group: str = "tradewatch-consumer"
    consumer_batch_size: int = 10000
    max_clock_skew_seconds: float = 300.0
    aggregator_group: str = "tradewatch-aggregator"
    window_sizes: str = "1m,5m,15m"
    symbol_idle_evict_seconds: float = 86400.0
    retention_days_trades: int = 7
    retention_days_trade_flags: int = 30
    retention_days_late_trades: int = 30
    retention_days_dead_letters: int = 30
    retention_days_alerts: int = 365
    retention_days_quotes: int = 2             # quotes and book_snapshots: ten messages a trade
    retention_days_minute_candles: int = 90     # stock_metrics and indicators of windows up to 1 minute
    retention_days_candles: int = 365           # … of longer windows
    # the size bound beside the age bound: GiB the database and the Parquet archive may take together;
    # past it (or with the disk low), `maintain` archives and drops the oldest days early. 0: no bound
    storage_max_gb: float = 10.0
    allowed_lateness_seconds: float = 5.0
    idle_timeout_seconds: float = 10.0
    aggregator_flush_ms: int = 500
    ohlc_exclude_conditions: str = ""
    auction_conditions: str = ""
    detector_group: str = "tradewatch-detector"
    quotes_group: str = "tradewatch-quotes"
    book_depth: int = 10                     # levels a side the simulator keeps and the snapshots store
    book_snapshot_seconds: float = 10.0      # a depth snapshot per symbol every this much event time
    metrics_address: str = "127.0.0.1"
    consumer_metrics_port: int = 9101
    aggregator_metrics_port: int = 9102
    detector_metrics_port: int = 9103
    producer_metrics_port: int = 9104
    quotes_metrics_port: int = 9105
    api_address: str = "127.0.0.1"
    api_port: int = 8000
    api_key: str = ""
    api_allowed_hosts: str = "127.0.0.1,localhost,::1"   # Host headers the API answers (DNS rebinding)
    api_stream_clients: int = 100       # live stream clients at once (SSE + WebSocket); more get 503
    api_stream_catch_up: int = 1_000    # missed items a resumed stream (Last-Event-ID) sends at most
    api_stream_queue: int = 1000
    api_stream_heartbeat_seconds: float = 15.0
    api_stream_send_timeout_seconds: float = 10.0
    report_currency: str = "USD"
    dashboard_refresh_seconds: int = 3
    dashboard_address: str = "127.0.0.1"
    dashboard_port: int = 8501
    flink_group: str = "tradewatch-flink"
    flink_checkpoint_seconds: int = 10
    flink_parallelism: int = 1
    flink_rest_port: int = 8081
    flink_rpc_port: int = 6123
    run_flink_in_demo: bool = False
    model_dir: str = "models"
    zscore_window: int = 50
    zscore_threshold: float = 8.0
    out_of_range_widths: float = 1.0         # OUT_OF_RANGE: band widths beyond the band's edge
    breaker_cool_off_seconds: float = 300.0
    alert_webhook_url: str = setting(default="", repr=False)        # its path and query carry tokens
    # where each severity's alerts go: "CRITICAL=webhook+email,HIGH=webhook,MEDIUM=log"; channels
    # webhook (ALERT_WEBHOOK_URL), email (SMTP_* below), log (the detector's log only); a severity not
    # named is logged only. Empty: every alert to the webhook when ALERT_WEBHOOK_URL is set.
    alert_routes: str = ""
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_starttls: bool = True
    smtp_user: str = ""
    smtp_password: str = setting(default="", repr=False)
    alert_email_from: str = "tradewatch@localhost"
    alert_email_to: str = ""                 # comma-separated addresses
    alert_cooldown_critical_seconds: float = 300.0
    alert_cooldown_high_seconds: float = 60.0
    alert_cooldown_medium_seconds: float = 30.0
    # make demo: the simulator's rate and anomaly rate, consumers in the group, a live venue instead
    demo_rate: float = 20.0
    demo_anomaly_rate: float = 0.005
    demo_history_minutes: float = 60.0       # simulated past sent into an empty data folder first; 0: none
    consumers: int = 1
    demo_live: str = ""
    demo_live_url: str = ""
    demo_book: bool = True                   # the producer sends order books and the quotes stage keeps them

    def __post_init__(self) -> None:
        self._validate()
        # A cluster started from one address: every node's address, so a client can bootstrap
        # while any one node is down (node n listens on the port + 100·(n−1), tradewatch/stack.py)
        if self.kafka_brokers > 1 and "," not in self.kafka_bootstrap_servers:
            host = self.kafka_bootstrap_servers.rsplit(":", 1)[0]
            nodes = ",".join(f"{host}:{port}" for _, port, _ in self.kafka_nodes)
            object.__setattr__(self, "kafka_bootstrap_servers", nodes)

    def _validate(self) -> None:
        """Every setting in its range (ValueError naming it): a zero queue, a NaN timeout or an empty
        window list would otherwise fail later, far from its cause."""
        for field in fields(self):
            value, key = getattr(self, field.name), field.name.upper()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                raise ValueError(f"setting {key} must be a finite number, got {value!r}")
            if field.name.endswith("_port"):
                lowest = 0 if field.name.endswith("metrics_port") else 1    # a metrics port of 0: off
                if not lowest <= value <= 65535:
                    raise ValueError(f"setting {key} must be a port ({lowest}..65535), got {value!r}")
            elif field.name in _MAY_BE_ZERO:
                if value < 0:
                    raise ValueError(f"setting {key} must be 0 or more, got {value!r}")
            elif value <= 0:
                raise ValueError(f"setting {key} must be more than 0, got {value!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"setting {name.upper()} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.routes                          # ALERT_ROUTES parsed, every channel it names configured
        if self.demo_anomaly_rate > 1:
            raise ValueError(f"setting DEMO_ANOMALY_RATE must be at most 1, got {self.demo_anomaly_rate!r}")
        from tradewatch.windows import parse_size
        sizes = [s.strip() for s in self.window_sizes.split(",") if s.strip()]
        if not sizes:
            raise ValueError(f"setting WINDOW_SIZES must list window sizes like 1m,5m,15m, got {self.window_sizes!r}")
        for size in sizes:
            try:
                parse_size(size)
            except ValueError as error:
                raise ValueError(f"setting WINDOW_SIZES: {error}") from None
        from tradewatch.candles import BASE_SIZE
        if BASE_SIZE not in self.window_labels:
            raise ValueError(f"setting WINDOW_SIZES must include {BASE_SIZE} (the overview, the scanner and Flink's "
                             f"comparison read the 1-minute candles), got {self.window_sizes!r}")

    @property
    def ohlc_excluded(self) -> frozenset[str]:
        """OHLC_EXCLUDE_CONDITIONS: sale conditions whose trades set no price in a candle."""
        return frozenset(c.strip() for c in self.ohlc_exclude_conditions.split(",") if c.strip())

    @property
    def auctions(self) -> frozenset[str]:
        """AUCTION_CONDITIONS: sale conditions of a market's opening and closing auction prints."""
        return frozenset(c.strip() for c in self.auction_conditions.split(",") if c.strip())

    @property
    def window_sizes_ms(self) -> tuple[int, ...]:
        """WINDOW_SIZES in milliseconds, smallest first, each once."""
        from tradewatch.windows import parse_size
        return tuple(sorted({parse_size(s) for s in self.window_sizes.split(",") if s.strip()}))

    @property
    def window_labels(self) -> tuple[str, ...]:
        """WINDOW_SIZES as the candle tables label them ('1m', '5m', …), smallest first."""
        from tradewatch.windows import size_label
        return tuple(size_label(ms) for ms in self.window_sizes_ms)

    @classmethod
    def load(cls, env_file: Path | None = None, **overrides: object) -> "Settings":
        """Defaults < `.env` file < environment variables < explicit overrides."""
        env_file = env_file or PROJECT_ROOT / ".env"
        file_values = dotenv_values(env_file) if env_file.exists() else {}
        values: dict[str, object] = {}
        for field in fields(cls):
            key = field.name.upper()
            raw = os.environ.get(key, file_values.get(key))
            if raw is None or raw == "":
                continue
            values[field.name] = _coerce(raw, type(getattr(cls, field.name)), key)
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: object) -> "Settings":
        return replace(self, **overrides)

    @property
    def routes(self) -> dict[str, frozenset[str]]:
        """Severity -> the channels its alerts are delivered to (ValueError naming the setting)."""
        if not self.alert_routes.strip():
            everything = frozenset({"webhook"} if self.alert_webhook_url else ())
            return {severity: everything for severity in SEVERITIES}
        routes = {severity: frozenset() for severity in SEVERITIES}
        for part in filter(None, (p.strip() for p in self.alert_routes.split(","))):
            severity, equals, channels = (x.strip() for x in part.partition("="))
            chosen = frozenset(c.strip().lower() for c in channels.split("+") if c.strip())
            if not equals or severity.upper() not in routes or not chosen or chosen - set(CHANNELS):
                raise ValueError(f"setting ALERT_ROUTES must be like CRITICAL=webhook+email,HIGH=webhook,"
                                 f"MEDIUM=log (severities {', '.join(SEVERITIES)}; channels "
                                 f"{', '.join(CHANNELS)}), got {part!r}")
            routes[severity.upper()] = chosen - {"log"}
        used = set().union(*routes.values())
        if "webhook" in used and not self.alert_webhook_url:
            raise ValueError("setting ALERT_ROUTES sends alerts to the webhook but ALERT_WEBHOOK_URL is empty")
        if "email" in used and not (self.smtp_host and self.alert_email_to.strip()):
            raise ValueError("setting ALERT_ROUTES sends alerts by e-mail but SMTP_HOST or ALERT_EMAIL_TO is empty")
        return routes

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes (the password resolved)."""
        env = {field.name.upper(): str(getattr(self, field.name)) for field in fields(self)}
        env["POSTGRES_PASSWORD"] = self.database_password
        return env

    @property
    def password_file(self) -> Path:
        """Where the local stack keeps the PostgreSQL password it generated (mode 0600)."""
        return self.home / "postgres-password"

    @property
    def database_password(self) -> str:
        """POSTGRES_PASSWORD when set, else the local stack's generated one (read when asked: the
        stack writes it at its first start)."""
        if self.postgres_password:
            return self.postgres_password
        try:
            return self.password_file.read_text().strip()
        except OSError:
            return ""

    @property
    def home(self) -> Path:
        path = Path(self.tradewatch_home)
        return path if path.is_absolute() else PROJECT_ROOT / path

    @property
    def model_path(self) -> Path:
        path = Path(self.model_dir)
        return path if path.is_absolute() else PROJECT_ROOT / path

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])

    @property
    def kafka_nodes(self) -> list[tuple[int, int, int]]:
        """(node id, broker port, controller port) of each local Kafka node."""
        return [(n, self.kafka_port + 100 * (n - 1), self.kafka_controller_port + 100 * (n - 1))
                for n in range(1, self.kafka_brokers + 1)]

    @property
    def postgres_dsn(self) -> str:
        return (
            f"host={self.postgres_host} port={self.postgres_port} dbname={self.postgres_db} "
            f"user={self.postgres_user} password={_dsn_quoted(self.database_password)} connect_timeout=5"
        )

    @property
    def sqlalchemy_url(self) -> str:
        return (
            f"postgresql+psycopg2://{self.postgres_user}:{quote(self.database_password, safe='')}"
            f"@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"
        )


SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW")
CHANNELS = ("webhook", "email", "log")

# numbers that may be 0 (the others must be more than 0)
_MAY_BE_ZERO = {"storage_max_gb",
                "allowed_lateness_seconds", "demo_history_minutes", "max_clock_skew_seconds", "breaker_cool_off_seconds",
                "alert_cooldown_critical_seconds", "alert_cooldown_high_seconds", "alert_cooldown_medium_seconds",
                "demo_anomaly_rate"}
_CHOICES = {"log_format": ("text", "json"), "kafka_client": ("confluent", "kafka-python"),
            "demo_live": ("", "coinbase", "binance")}


def _dsn_quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _coerce(raw: str, kind: type, key: str) -> object:
    if kind is bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"setting {key} must be true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"setting {key} must be a whole number, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"setting {key} must be a number, got {raw!r}") from None
    return raw
