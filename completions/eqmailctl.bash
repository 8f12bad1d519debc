# bash completion for eqmailctl(8).
# Installed as share/bash-completion/completions/eqmailctl.bash (bash-completion 2.x
# loads it on demand, also from PREFIX/share of the directory eqmailctl is run from);
# or source it from ~/.bashrc.  Needs nothing from bash-completion itself.

_eqmailctl_queue_ids() {
    # the ids qmail-qread's listing shows ("... GMT  #ID  SIZE  <sender>")
    "$1" "${@:2}" queue list 2>/dev/null | sed -n 's/^.* GMT  #\([0-9][0-9]*\)  .*$/\1/p'
}

_eqmailctl() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD-1]}
    local commands="setup start stop status reload check cert import-qmail queue dkim tlsrpt"
    local i cmd="" at=0
    local -a rootopt=()
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --root) rootopt=(--root "${COMP_WORDS[i+1]}"); ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; at=$i; break ;;
        esac
    done
    if [[ $prev == --root ]]; then
        COMPREPLY=($(compgen -d -- "$cur"))
        return 0
    fi
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "--root --help --version $commands" -- "$cur"))
        return 0
    fi
    local arg=$((COMP_CWORD - at))  # 1 = the word after the command
    case $cmd in
        setup)
            [[ $prev == --me ]] && return 0
            COMPREPLY=($(compgen -W "--me --force --help" -- "$cur")) ;;
        start)
            COMPREPLY=($(compgen -W "--foreground --help" -- "$cur")) ;;
        stop|reload)
            COMPREPLY=($(compgen -W "--help" -- "$cur")) ;;
        status|check)
            COMPREPLY=($(compgen -W "--json --help" -- "$cur")) ;;
        tlsrpt)
            [[ $prev == --date ]] && return 0
            COMPREPLY=($(compgen -W "--date --json --help" -- "$cur")) ;;
        cert)
            if ((arg == 1)); then
                COMPREPLY=($(compgen -W "renew request install show dh --help" -- "$cur"))
            elif [[ $prev == --me || $prev == --days ]]; then
                return 0
            elif [[ ${COMP_WORDS[at+1]} == install && $cur != -* ]]; then
                COMPREPLY=($(compgen -f -- "$cur"))
            else
                COMPREPLY=($(compgen -W "--me --rsa --days --help" -- "$cur"))
            fi ;;
        import-qmail)
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "--force --dry-run --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -d -- "$cur"))
            fi ;;
        dkim)
            local daction=${COMP_WORDS[at+1]}
            if ((arg == 1)); then
                COMPREPLY=($(compgen -W "keygen show check --help" -- "$cur"))
            elif [[ $prev == --type ]]; then
                COMPREPLY=($(compgen -W "rsa ed25519" -- "$cur"))
            elif [[ $prev == --selector || $prev == --bits || $prev == --timeout ]]; then
                return 0
            elif [[ $cur == -* ]]; then
                case $daction in
                    keygen) COMPREPLY=($(compgen -W "--selector --type --bits --force --help" -- "$cur")) ;;
                    check) COMPREPLY=($(compgen -W "--timeout --help" -- "$cur")) ;;
                    *) COMPREPLY=($(compgen -W "--help" -- "$cur")) ;;
                esac
            fi ;;
        queue)
            local action=${COMP_WORDS[at+1]}
            if ((arg == 1)); then
                COMPREPLY=($(compgen -W "stat list show flush delete bounce --help" -- "$cur"))
            elif [[ $cur == -* ]]; then
                case $action in
                    stat|list|show) COMPREPLY=($(compgen -W "--json --help" -- "$cur")) ;;
                    *) COMPREPLY=($(compgen -W "--help" -- "$cur")) ;;
                esac
            elif ((arg == 2)) && [[ $action == show || $action == delete || $action == bounce ]]; then
                COMPREPLY=($(compgen -W "$(_eqmailctl_queue_ids "${COMP_WORDS[0]}" "${rootopt[@]}")" -- "$cur"))
            fi ;;
    esac
    return 0
}

complete -F _eqmailctl eqmailctl
