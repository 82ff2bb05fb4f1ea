{{/* Names and labels shared by every template. */}}

{{- define "acs-identity-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; cluster-scoped objects carry it, so releases never collide. */}}
{{- define "acs-identity-operator.fullname" -}}
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

{{- define "acs-identity-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "acs-identity-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "acs-identity-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "acs-identity-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "acs-identity-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "acs-identity-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: repository@digest when a digest is set (the tag is then ignored), else repository:tag. */}}
{{- define "acs-identity-operator.image" -}}
{{- if .Values.image.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .Values.image.digest) }}
{{- fail "image.digest must be sha256:<64 hex digits>" }}
{{- end }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Where an extra CA is mounted, if one is configured. */}}
{{- define "acs-identity-operator.extraCAPath" -}}
/etc/acs-identity-operator/extra-ca/ca.crt
{{- end }}

{{/* Fails the render on contradictory values instead of installing something half-working. */}}
{{- define "acs-identity-operator.validate" -}}
{{- if and .Values.extraCA.configMap.name .Values.extraCA.secret.name }}
{{- fail "set at most one of extraCA.configMap.name and extraCA.secret.name" }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicas > 1 needs leaderElection.enabled=true: two replicas must never both act" }}
{{- end }}
{{- if not (has .Values.logFormat (list "text" "json")) }}
{{- fail "logFormat must be text or json" }}
{{- end }}
{{- end }}
