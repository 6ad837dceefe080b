# The TradeWatch app image for docker-compose.yml (Docker users only; the local stack needs no Docker).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY infra/pom.xml infra/pom.xml
COPY Makefile .
RUN make jars
COPY . .
# the apps need no privilege: an unprivileged user owns nothing but what it writes (reports, models)
RUN useradd --system --uid 10001 --home-dir /app tradewatch && mkdir -p reports models .tradewatch \
    && chown -R tradewatch /app/reports /app/models /app/.tradewatch
USER tradewatch
