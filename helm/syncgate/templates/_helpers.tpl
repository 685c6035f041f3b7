{{/* The chart's name. */}}
{{- define "syncgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: <release>-<chart> unless the release already says it. */}}
{{- define "syncgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "syncgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "syncgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.role }}
{{- end }}

{{- define "syncgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "syncgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: syncgate
{{- end }}

{{- define "syncgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "syncgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "syncgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether central keeps its op log on a volume of its own (SQLite). */}}
{{- define "syncgate.ownVolume" -}}
{{- if and .Values.persistence.enabled (or (ne .Values.role "central") (not .Values.central.database.url)) }}true{{- end }}
{{- end }}

{{/* Central's replicas (the edge runs one). */}}
{{- define "syncgate.replicas" -}}
{{- if eq .Values.role "central" }}{{ int (default 1 .Values.central.replicas) }}{{ else }}1{{ end }}
{{- end }}

{{/* Whether central runs the embedded broker. */}}
{{- define "syncgate.embeddedBroker" -}}
{{- if and (eq .Values.role "central") (not .Values.central.externalBroker) }}true{{- end }}
{{- end }}

{{/* Where the Secrets are mounted. */}}
{{- define "syncgate.secretDir" -}}/run/secrets/syncgate{{- end }}

{{/*
The role's section of the configuration file, as a dict: what the values say,
then `config` over it.
*/}}
{{- define "syncgate.settings" -}}
{{- $v := .Values }}
{{- $dir := include "syncgate.secretDir" . }}
{{- $s := dict "admin_listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) }}
{{- $_ := set $s "admin_token_file" (printf "%s/admin-token" $dir) }}
{{- $_ := set $s "sync_key_file" (printf "%s/sync-key" $dir) }}
{{- if $v.secrets.brokerToken.name }}
{{- $_ := set $s "broker_token_file" (printf "%s/broker-token" $dir) }}
{{- end }}
{{- if $v.brokerUser }}
{{- $_ := set $s "broker_user" $v.brokerUser }}
{{- $_ := set $s "broker_password_file" (printf "%s/broker-password" $dir) }}
{{- end }}
{{- if eq $v.role "central" }}
{{- $_ := set $s "db" (default "sqlite:///var/lib/syncgate/central.db" $v.central.database.url) }}
{{- if $v.secrets.databasePassword.name }}
{{- $_ := set $s "db_password_file" (printf "%s/db-password" $dir) }}
{{- end }}
{{- $_ := set $s "listen" (printf "0.0.0.0:%d" (int $v.ports.proxy)) }}
{{- $_ := set $s "upstream" $v.central.upstream }}
{{- with $v.central.publicUrl }}{{ $_ := set $s "public_url" . }}{{ end }}
{{- $_ := set $s "edges" $v.central.edges }}
{{- $_ := set $s "allow_new_edges" $v.central.allowNewEdges }}
{{- with $v.central.edgeScopes }}
{{- $entries := list }}
{{- range $edge, $scope := . }}
{{- $parts := list }}
{{- with $scope.domains }}{{ $parts = append $parts (printf "domains:%s" (join "," .)) }}{{ end }}
{{- with $scope.replicate }}{{ $parts = append $parts (printf "replicate:%s" (join "," .)) }}{{ end }}
{{- $entries = append $entries (printf "%s=%s" $edge (default "all" (join ";" $parts))) }}
{{- end }}
{{- $_ := set $s "edge_scope" (join " " $entries) }}
{{- end }}
{{- $_ := set $s "ack_timeout" $v.central.ackTimeout }}
{{- $_ := set $s "drift_interval" (toString $v.central.driftInterval) }}
{{- $_ := set $s "retention" (toString $v.central.retention) }}
{{- $_ := set $s "edge_expiry" (toString $v.central.edgeExpiry) }}
{{- if $v.central.externalBroker }}
{{- $_ := set $s "broker" $v.central.externalBroker }}
{{- else }}
{{- $_ := set $s "broker_listen" (printf "0.0.0.0:%d" (int $v.ports.broker)) }}
{{- end }}
{{- if $v.secrets.oplogKey.name }}
{{- $_ := set $s "oplog_key_file" (printf "%s/oplog-key" $dir) }}
{{- end }}
{{- else }}
{{- $_ := set $s "db" "sqlite:///var/lib/syncgate/edge.db" }}
{{- $_ := set $s "id" $v.edge.id }}
{{- $_ := set $s "broker" $v.edge.broker }}
{{- $_ := set $s "upstream" $v.edge.upstream }}
{{- $_ := set $s "on_failure" $v.edge.onFailure }}
{{- $_ := set $s "max_attempts" (int $v.edge.maxAttempts) }}
{{- $_ := set $s "hello_interval" $v.edge.helloInterval }}
{{- $_ := set $s "initial_sync" $v.edge.initialSync }}
{{- end }}
{{- $t := $v.tls }}
{{- if $t.secretName }}
{{- $_ := set $s "tls_cert" (printf "%s/tls/tls.crt" $dir) }}
{{- $_ := set $s "tls_key" (printf "%s/tls/tls.key" $dir) }}
{{- end }}
{{- if $t.upstreamCa.name }}
{{- $_ := set $s "upstream_ca" (printf "%s/upstream-ca.pem" $dir) }}
{{- end }}
{{- if and (eq $v.role "central") $t.adminCa.name }}
{{- $_ := set $s "admin_ca" (printf "%s/admin-ca.pem" $dir) }}
{{- end }}
{{- if and $t.broker.ca.name (or (ne $v.role "central") $v.central.externalBroker) }}
{{- $_ := set $s "broker_ca" (printf "%s/broker-ca.pem" $dir) }}
{{- end }}
{{- if eq $v.role "central" }}
{{- if and $t.broker.secretName (not $v.central.externalBroker) }}
{{- $_ := set $s "broker_tls_cert" (printf "%s/broker-tls/tls.crt" $dir) }}
{{- $_ := set $s "broker_tls_key" (printf "%s/broker-tls/tls.key" $dir) }}
{{- if $t.broker.clientCa.name }}
{{- $_ := set $s "broker_tls_client_ca" (printf "%s/broker-client-ca.pem" $dir) }}
{{- end }}
{{- end }}
{{- if $t.broker.centralClientSecretName }}
{{- $_ := set $s "broker_client_cert" (printf "%s/broker-client/tls.crt" $dir) }}
{{- $_ := set $s "broker_client_key" (printf "%s/broker-client/tls.key" $dir) }}
{{- end }}
{{- else if $t.broker.secretName }}
{{- $_ := set $s "broker_tls_cert" (printf "%s/broker-tls/tls.crt" $dir) }}
{{- $_ := set $s "broker_tls_key" (printf "%s/broker-tls/tls.key" $dir) }}
{{- end }}
{{- toJson (mergeOverwrite $s (deepCopy $v.config)) }}
{{- end }}

{{/* The configuration file (TOML; JSON strings, numbers, booleans and lists are TOML too). */}}
{{- define "syncgate.configToml" -}}
# syncgate {{ .Values.role }}: rendered by the chart from its values.
log_format = {{ .Values.logFormat | toJson }}

[{{ .Values.role }}]
{{- $settings := include "syncgate.settings" . | fromJson }}
{{- range $key := keys $settings | sortAlpha }}
{{ $key }} = {{ get $settings $key | toJson }}
{{- end }}
{{- end }}

{{/* Fails the render with one clear line when a required value is missing. */}}
{{- define "syncgate.validate" -}}
{{- if not .Values.secrets.syncKey.name }}
{{- fail "secrets.syncKey.name is required: a Secret holding the sync key (syncgate keygen), the same at central and every edge" }}
{{- end }}
{{- if not .Values.secrets.adminToken.name }}
{{- fail "secrets.adminToken.name is required: the admin API listens on the pod network and needs a bearer token" }}
{{- end }}
{{- if and (eq .Values.role "central") (not .Values.central.externalBroker) .Values.tls.broker.centralClientSecretName (not .Values.tls.broker.secretName) }}
{{- fail "tls.broker.centralClientSecretName needs TLS at the embedded broker: set tls.broker.secretName (or central.externalBroker)" }}
{{- end }}
{{- if and (eq .Values.role "central") (not .Values.central.externalBroker) .Values.tls.broker.clientCa.name .Values.tls.broker.secretName (not .Values.tls.broker.centralClientSecretName) }}
{{- fail "tls.broker.clientCa makes the embedded broker require client certificates, central's own client too: set tls.broker.centralClientSecretName" }}
{{- end }}
{{- if and .Values.brokerUser (not .Values.secrets.brokerPassword.name) }}
{{- fail "brokerUser is set but secrets.brokerPassword.name is not: name the Secret holding that user's broker password" }}
{{- end }}
{{- if and .Values.secrets.brokerPassword.name (not .Values.brokerUser) }}
{{- fail "secrets.brokerPassword.name is set but brokerUser is not: name the broker user the password is for" }}
{{- end }}
{{- if and .Values.brokerUser .Values.secrets.brokerToken.name }}
{{- fail "brokerUser and secrets.brokerToken.name are both set: the broker takes a user and password or a token, not both" }}
{{- end }}
{{- if eq .Values.role "central" }}
{{- if not .Values.central.upstream }}
{{- fail "central.upstream is required for role central: the central Keystone's URL" }}
{{- end }}
{{- $replicas := int (default 1 .Values.central.replicas) }}
{{- if and (gt $replicas 1) (not .Values.central.database.url) }}
{{- fail (printf "central.replicas is %d but the op log is a SQLite file (central.database.url is empty): several central replicas share one op log, on PostgreSQL; set central.database.url to postgres://USER@HOST:PORT/DB, or central.replicas to 1" $replicas) }}
{{- end }}
{{- if and (gt $replicas 1) (not .Values.central.externalBroker) }}
{{- fail (printf "central.replicas is %d but central.externalBroker is empty: several central replicas cannot share the embedded broker; run a NATS cluster (https://github.com/nats-io/k8s/tree/main/helm/charts/nats) and set central.externalBroker to nats://HOST:4222" $replicas) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.proxyFrom) }}
{{- fail "networkPolicy.enabled with an empty networkPolicy.proxyFrom would admit no client to the proxy port (every identity request refused): list Keystone's clients there, e.g. [{namespaceSelector: {}}] for every namespace of the cluster" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.central.externalBroker) (not .Values.networkPolicy.brokerFrom) }}
{{- fail "networkPolicy.enabled with an empty networkPolicy.brokerFrom would admit no edge to the embedded broker (nothing replicated): list the edges' networks there, e.g. [{ipBlock: {cidr: 10.20.0.0/16}}]" }}
{{- end }}
{{- if and .Values.secrets.databasePassword.name (not .Values.central.database.url) }}
{{- fail "secrets.databasePassword.name is set but central.database.url is not: the password is for a PostgreSQL op log (postgres://USER@HOST:PORT/DB)" }}
{{- end }}
{{- else }}
{{- if not .Values.edge.id }}{{ fail "edge.id is required for role edge" }}{{ end }}
{{- if not .Values.edge.broker }}{{ fail "edge.broker is required for role edge: central's broker, nats://host:4222" }}{{ end }}
{{- if not .Values.edge.upstream }}{{ fail "edge.upstream is required for role edge: this site's Keystone URL" }}{{ end }}
{{- if not .Values.credentials.secret.name }}
{{- fail "credentials.secret.name is required for role edge: the Secret with the edge's Keystone password or application credential secret" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A probe from the values; an HTTP one uses HTTPS when the admin listener
     serves it (tls.secretName). Called with (list $ probe). */}}
{{- define "syncgate.probe" -}}
{{- $root := index . 0 }}
{{- $probe := deepCopy (index . 1) }}
{{- if and $root.Values.tls.secretName $probe.httpGet }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* How Prometheus scrapes the admin port: HTTPS with metrics.tlsConfig
     when the listener serves it (tls.secretName). */}}
{{- define "syncgate.scrapeTls" -}}
{{- if .Values.tls.secretName }}
scheme: https
{{- with .Values.metrics.tlsConfig }}
tlsConfig:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
